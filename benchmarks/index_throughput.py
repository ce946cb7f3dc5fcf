"""Indexing throughput by precision (float32, bfloat16, int8 side by side, one run), on real-size JPEGs:

- (a) the raw CLIP image model on ready-made tensors;
- (a) also with each batch split as the encoder splits it (one part per torch thread, side by side);
- (r) the best raw loop: read -> draft decode -> preprocess -> model in one plain process (serial, and
  with a decode thread pool ahead of the model and each batch split as the encoder splits it), the same model,
  precision and preprocessing as the flow;
- (c) the CLIPImageEncoder executor alone (its decode pool ahead of the model, no gRPC, no indexer);
- (b) the index flow as `clipseek index` drives it (files -> client -> gRPC -> encoder -> indexer -> memmap);
- (p) the float32 reference: transformers' CLIPImageProcessor + the float32 model, one image batch after another;

with each precision's embeddings compared to float32's, and a per-stage split of where each second goes.

    python benchmarks/index_throughput.py                                  # 320 photos, batch 32 (several minutes on 2 cores)
    python benchmarks/index_throughput.py --precisions bfloat16 --images 160
    CLIPSEEK_TORCH_THREADS=1 python benchmarks/index_throughput.py --precisions float32

The model is ViT-B/32 shaped (transformers ``CLIPConfig()`` defaults) with random weights: the
speed is that of the real model, the embeddings are not meaningful.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import Results, image_rate, make_photos, options_of  # noqa: E402  (sets sys.path and offline env)
from clipseek.demo.modelkit import make_vit_b32  # noqa: E402
from flows.settings import DEFAULT_REQUEST_SIZE  # noqa: E402


def in_fresh_process(*args: str, threads=None) -> dict:
    """This script run again with ``args`` in a fresh process, as clean as an executor's own
    (``threads``: torch threads, None = torch's default); the JSON it prints last."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, os.path.abspath(__file__), *args] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_model_fresh(model_dir: str, batch_size: int, images: int, threads=None, dtype: str = "float32") -> dict:
    """image_rate in a fresh process, each batch on every thread and split into parts side by side as the encoder
    runs it: {"rate": images/s, "side_by_side": images/s, "streams": parts, "threads": torch threads}."""
    return in_fresh_process("--raw-child", model_dir, "--batch-size", str(batch_size), "--images", str(images),
                            "--dtype", dtype, threads=threads)


def raw_loop(clip, paths, warm, batch_size: int, threaded: bool):
    """images/s of a plain loop over the files: read, draft decode, preprocess (serially, or in a thread pool
    of one thread per CPU running ahead of the model), then the model batch by batch; and the embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    from executors.clip_image_encoder import DRAFT_FACTOR
    from executors.images.imaging import Preprocess, decode_image, preprocess, read_source
    from executors.models.loading import embed_in_order, image_streams
    from executors.params import worker_threads

    recipe = Preprocess.from_processor_config(clip.processor_config)
    streams = image_streams(clip) if threaded else 1

    def prepare(path):
        return preprocess(decode_image(read_source(path).data, path, draft_size=recipe.shortest_edge * DRAFT_FACTOR), recipe)

    def stacked(pixels):
        batch = []
        for array in pixels:
            batch.append(array)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def run(files):
        with ThreadPoolExecutor(worker_threads()) as pool:
            pixels = pool.map(prepare, files) if threaded else map(prepare, files)
            return np.concatenate(list(embed_in_order(clip, stacked(pixels), streams)))

    run(warm)
    t0 = time.perf_counter()
    vectors = run(paths)
    return len(paths) / (time.perf_counter() - t0), vectors


def processor_loop(model_dir: str, paths, warm, batch_size: int):
    """images/s of the float32 reference: PIL full decode, transformers' CLIPImageProcessor, float32 model."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from executors.models.loading import features

    processor = CLIPImageProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()

    def run(files):
        for start in range(0, len(files), batch_size):
            images = [Image.open(p).convert("RGB") for p in files[start : start + batch_size]]
            inputs = processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                features(model.get_image_features(**inputs))

    run(warm)
    t0 = time.perf_counter()
    run(paths)
    return len(paths) / (time.perf_counter() - t0)


def encoder_alone(model_dir: str, paths, warm, batch_size: int, request_size: int, dtype: str = "float32") -> float:
    """images/s of the CLIPImageEncoder executor itself (decode pool ahead of the model, draft decode),
    called in this process on requests of ``request_size`` photos: no gRPC, no gateway, no indexer."""
    from docarray import DocList

    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.docs import ImageInput
    from executors.images.imaging import path_uri

    def request(part):
        return DocList[ImageInput]([ImageInput(uri=path_uri(p), url=path_uri(p)) for p in part])

    encoder = CLIPImageEncoder(pretrained_model_name_or_path=model_dir, device="cpu", batch_size=batch_size, dtype=dtype)
    try:
        encoder.encode(request(warm))
        t0 = time.perf_counter()
        for start in range(0, len(paths), request_size):
            done = encoder.encode(request(paths[start : start + request_size]))
            failed = [d.error for d in done if d.embedding is None]
            if failed:
                raise SystemExit(f"the encoder failed on {len(failed)} photos: {failed[:3]}")
        return len(paths) / (time.perf_counter() - t0)
    finally:
        encoder.close()


def child_with_photos(flag: str, model_dir: str, paths, warm, batch_size: int, request_size: int, dtype: str,
                      threads=None) -> dict:
    """``flag``'s measurement in a fresh process (as clean as an executor's own), given the photo list."""
    import json

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"paths": list(paths), "warm": list(warm)}, f)
    try:
        return in_fresh_process(flag, model_dir, "--photo-list", f.name, "--batch-size", str(batch_size),
                                "--request-size", str(request_size), "--dtype", dtype, threads=threads)
    finally:
        os.unlink(f.name)


def served_flow(model_dir: str, paths, warm, batch_size: int, request_size: int, dtype: str) -> float:
    """images/s of the index flow served in its own process, driven as `clipseek index` drives it."""
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model_dir,
                            device="cpu", dtype=dtype, batch_size=batch_size, workspace=workspace)
        with flows_in_subprocess(settings, log_file=os.path.join(workspace, "clipseek.log")):
            client = ClipseekClient(settings.index_address, settings.search_address)
            client.index(warm, batch_size=batch_size, force=True)  # first model call, first decode
            t0 = time.perf_counter()
            report = client.index(paths, batch_size=request_size, force=True)
            elapsed = time.perf_counter() - t0
            if len(report.indexed) != len(paths):
                raise SystemExit(f"{dtype}: indexed {len(report.indexed)} of {len(paths)}: {report.failed[:3]}")
    return len(paths) / elapsed


def stage_split(clip, paths, batch_size: int, draft: bool, store_dir: str):
    """Seconds per image of each stage, run one after the other in this process (no overlap)."""
    from executors.clip_image_encoder import DRAFT_FACTOR
    from executors.models.loading import image_embeddings
    from executors.images.imaging import Preprocess, decode_image, preprocess, read_source
    from executors.store.vector_store import Record, VectorStore

    recipe = Preprocess.from_processor_config(clip.processor_config)
    spent = dict(read=0.0, decode=0.0, preprocess=0.0, model=0.0, write=0.0)
    store = VectorStore(store_dir)
    embeddings = []
    try:
        for start in range(0, len(paths), batch_size):
            arrays = []
            for path in paths[start : start + batch_size]:
                t0 = time.perf_counter()
                info = read_source(path)
                t1 = time.perf_counter()
                img = decode_image(info.data, path, draft_size=recipe.shortest_edge * DRAFT_FACTOR if draft else None)
                t2 = time.perf_counter()
                arrays.append(preprocess(img, recipe))
                t3 = time.perf_counter()
                spent["read"] += t1 - t0
                spent["decode"] += t2 - t1
                spent["preprocess"] += t3 - t2
            t0 = time.perf_counter()
            vectors = image_embeddings(clip, np.stack(arrays))
            t1 = time.perf_counter()
            store.upsert(vectors, [Record(id=f"{draft}-{start + i}", uri=p) for i, p in enumerate(paths[start : start + batch_size])],
                         model=clip.name)
            spent["write"] += time.perf_counter() - t1
            spent["model"] += t1 - t0
            embeddings.append(vectors)
    finally:
        store.close()
    return {k: v / len(paths) for k, v in spent.items()}, np.concatenate(embeddings)


def draft_cosines(clip, paths, factor: int):
    """Cosine between the embedding of a full decode and of a draft decode at ``factor`` x the resize target."""
    from executors.models.loading import image_embeddings
    from executors.images.imaging import Preprocess, decode_image, preprocess

    recipe = Preprocess.from_processor_config(clip.processor_config)
    full, draft, pixel_diff = [], [], []
    for path in paths:
        data = open(path, "rb").read()
        a = preprocess(decode_image(data), recipe)
        b = preprocess(decode_image(data, draft_size=recipe.shortest_edge * factor), recipe)
        full.append(a)
        draft.append(b)
        pixel_diff.append(np.abs(a - b).mean())
    cos = []
    for start in range(0, len(paths), 32):
        ea = image_embeddings(clip, np.stack(full[start : start + 32]))
        eb = image_embeddings(clip, np.stack(draft[start : start + 32]))
        cos.append((ea * eb).sum(axis=1))
    cos = np.concatenate(cos)
    return float(cos.mean()), float(cos.min()), float(np.mean(pixel_diff))


def photo_to_photo_cosine(clip, paths):
    """Mean cosine between the embeddings of different photos: the scale that a draft's cost compares to."""
    from executors.models.loading import image_embeddings
    from executors.images.imaging import Preprocess, decode_image, preprocess

    recipe = Preprocess.from_processor_config(clip.processor_config)
    e = image_embeddings(clip, np.stack([preprocess(decode_image(open(p, "rb").read()), recipe) for p in paths[:32]]))
    sims = e @ e.T
    return float(sims[~np.eye(len(e), dtype=bool)].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320, help="photos to index end to end (default 320)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--request-size", type=int, default=DEFAULT_REQUEST_SIZE,
                        help=f"images per gRPC request (default {DEFAULT_REQUEST_SIZE}, as `clipseek index` sends)")
    parser.add_argument("--precisions", default="float32,bfloat16,int8", help="precisions to compare (default all three)")
    parser.add_argument("--split-images", type=int, default=64, help="photos for the serial per-stage split and the draft cosine (default 64)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"),
                        help="photos and the model are cached here between runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default, as in the executor)")
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    for child in ("--raw-child", "--encoder-child", "--loop-child", "--processor-child", "--photo-list"):
        parser.add_argument(child, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import json

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.photo_list:
        with open(args.photo_list) as f:
            listed = json.load(f)
    if args.encoder_child:
        rate = encoder_alone(args.encoder_child, listed["paths"], listed["warm"], args.batch_size, args.request_size, args.dtype)
        print(json.dumps({"rate": rate}))
        return
    if args.processor_child:
        print(json.dumps({"rate": processor_loop(args.processor_child, listed["paths"], listed["warm"], args.batch_size)}))
        return
    if args.loop_child or args.raw_child:
        from executors.models.loading import load_clip

        clip = load_clip(args.loop_child or args.raw_child, "cpu", args.dtype)
        if args.raw_child:
            from executors.models.loading import image_streams

            streams = image_streams(clip)
            print(json.dumps({"rate": image_rate(clip, args.batch_size, args.images, warmup=2),
                              "side_by_side": image_rate(clip, args.batch_size, args.images, warmup=2, streams=streams),
                              "streams": streams, "threads": torch.get_num_threads()}))
            return
        serial, vectors = raw_loop(clip, listed["paths"], listed["warm"], args.batch_size, threaded=False)
        threaded, _ = raw_loop(clip, listed["paths"], listed["warm"], args.batch_size, threaded=True)
        print(json.dumps({"serial": serial, "threaded": threaded, "vectors": vectors[:64].tolist()}))
        return

    from executors.models.loading import load_clip
    from executors.models.precision import cpu_capabilities
    from executors.params import usable_cpus

    report = Results(__file__, options_of(args, hide=("dtype", "raw_child", "encoder_child", "loop_child", "processor_child",
                                                      "photo_list")))
    t0 = time.perf_counter()
    photos = make_photos(os.path.join(args.work_dir, "photos"), args.images + args.batch_size, seed=0)
    warm, photos = photos[: args.batch_size], photos[args.batch_size :]
    model_dir = make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))
    mb = sum(os.path.getsize(p) for p in photos) / 2**20
    for path in warm + photos:  # every path below then reads the files from the page cache, not the disk
        with open(path, "rb") as f:
            f.read()
    caps = ", ".join(k for k, v in cpu_capabilities().items() if v) or "none of avx2 / vnni / avx512_bf16 / amx"
    print(f"{len(photos)} photos ({mb:.0f} MiB of JPEG, {mb / len(photos):.2f} MiB each on average), model ready "
          f"in {time.perf_counter() - t0:.0f} s; {usable_cpus()} usable CPUs ({caps}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.request_size} per request", flush=True)

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    reference = child_with_photos("--processor-child", model_dir, photos, warm, args.batch_size, args.request_size,
                                  "float32", args.threads)["rate"]
    print(f"(p) float32 reference, CLIPImageProcessor + float32 model: {reference:.2f} images/s", flush=True)
    results, vectors = {}, {}
    for dtype in precisions:
        raw = raw_model_fresh(model_dir, args.batch_size, min(args.images, 192), args.threads, dtype)
        loop = child_with_photos("--loop-child", model_dir, photos, warm, args.batch_size, args.request_size, dtype, args.threads)
        alone = child_with_photos("--encoder-child", model_dir, photos, warm, args.batch_size, args.request_size, dtype,
                                  args.threads)["rate"]
        flow = served_flow(model_dir, photos, warm, args.batch_size, args.request_size, dtype)
        vectors[dtype] = np.asarray(loop["vectors"], dtype=np.float32)
        results[dtype] = dict(raw=raw["rate"], side=raw["side_by_side"], streams=raw["streams"], serial=loop["serial"],
                              threaded=loop["threaded"], alone=alone, flow=flow)
        print(f"{dtype}: (a) {raw['rate']:.2f} / {raw['side_by_side']:.2f} split in {raw['streams']}, "
              f"(r) serial {loop['serial']:.2f} / threaded {loop['threaded']:.2f}, "
              f"(c) {alone:.2f}, (b) {flow:.2f} images/s", flush=True)

    fastest = max(max(r["raw"], r["side"]) for r in results.values())
    rows = []
    for dtype in precisions:
        r = results[dtype]
        best = max(r["serial"], r["threaded"])
        cos = "1" if dtype == "float32" or "float32" not in vectors else \
            f"{float((vectors[dtype] * vectors['float32']).sum(axis=1).min()):.5f}"
        rows.append([dtype, f"{r['raw']:.2f} / {r['side']:.2f}", f"{r['serial']:.2f} / {r['threaded']:.2f}", f"{r['alone']:.2f}",
                     f"{r['flow']:.2f}", f"{r['flow'] / best:.2f}", f"{r['flow'] / fastest:.2f}", f"{r['flow'] / reference:.2f}", cos])
    streams = sorted({r["streams"] for r in results.values()})
    report.table(f"Throughput by precision, images/s: {len(photos)} photos ({mb / len(photos):.2f} MiB of JPEG each on "
                 f"average), batch {args.batch_size}, {args.request_size} per request, cpu, torch "
                 f"{torch.get_num_threads()} threads, draft decode; (a) each batch on every thread / split into "
                 f"{' or '.join(map(str, streams))} parts side by side on a share of them each; fastest (a) = **{fastest:.2f}**; "
                 f"(p) float32 CLIPImageProcessor + model loop = **{reference:.2f}** images/s",
                 ["precision", "(a) raw model, whole / split", "(r) raw loop serial / threaded", "(c) encoder alone",
                  "(b) index flow", "(b) / best (r)", "(b) / fastest (a)", "(b) / (p)", "min cosine to float32"], rows)

    split_paths = photos[: args.split_images]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in precisions:
            clip = load_clip(model_dir, "cpu", dtype)
            s, _ = stage_split(clip, split_paths, args.batch_size, True, os.path.join(tmp, dtype))
            total = sum(s.values())
            rows.append([dtype] + [f"{1000 * s[k]:.1f} ({100 * s[k] / total:.0f}%)" for k in ("read", "decode", "preprocess", "model", "write")]
                        + [f"{1000 * total:.1f}"])
            del clip
    report.table(f"Where each second goes: ms per image, stages one after the other on {len(split_paths)} photos "
                 f"(draft decode)", ["precision", "read", "decode", "preprocess", "model", "write", "total"], rows)

    clip = load_clip(model_dir, "cpu", "float32")
    cosines = {f: draft_cosines(clip, split_paths, f) for f in (1, 2)}
    between = photo_to_photo_cosine(clip, split_paths)
    rows = [[f"draft, short side >= {f}x the resize target", f"{c[0]:.6f}", f"{1 - c[1]:.1e}", f"{c[2]:.4f}"] for f, c in cosines.items()]
    report.table(f"What draft decoding costs: embeddings of the same {len(split_paths)} photos, draft vs full decode "
                 f"(for scale: two different photos score {between:.4f} on average with this random-weight model)",
                 ["decode", "mean cosine to full decode", "worst 1 - cosine", "mean abs pixel diff (normalized units)"], rows)
    report.write()


if __name__ == "__main__":
    main()
