"""Indexing throughput: the raw CLIP image model on ready-made tensors against the whole index
flow (files -> gRPC -> CLIPImageEncoder -> SimpleIndexer -> memmap) and against the image
encoder executor alone (its decode pool ahead of the model, no gRPC), with a per-stage time
split and the ceiling that perfect overlap would give on this machine's CPUs.

    python benchmarks/index_throughput.py                      # 320 photos, batch 32, 256 per request (a few minutes on 2 cores)
    python benchmarks/index_throughput.py --modes draft        # the flow with draft decode only (the default)
    CLIPSEEK_TORCH_THREADS=1 python benchmarks/index_throughput.py --modes draft --request-size 64

The model is ViT-B/32 shaped (transformers ``CLIPConfig()`` defaults) with random weights: the
speed is that of the real model, the embeddings are not meaningful.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np

from common import make_photos, make_vit_b32, table  # noqa: E402  (sets sys.path and offline env)
from flows.settings import DEFAULT_REQUEST_SIZE  # noqa: E402


def raw_model(clip, batch_size: int, images: int, warmup: int = 2) -> float:
    """images/s of get_image_features + L2 norm on random (B, 3, 224, 224) float32 tensors."""
    from executors.clip_model import image_embeddings

    size = clip.processor_config.get("crop_size", {}).get("height", 224)
    x = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    for _ in range(warmup):
        image_embeddings(clip, x)
    batches = max(1, math.ceil(images / batch_size))
    t0 = time.perf_counter()
    for _ in range(batches):
        image_embeddings(clip, x)
    return batches * batch_size / (time.perf_counter() - t0)


def in_fresh_process(*args: str, threads=None) -> dict:
    """This script run again with ``args`` in a fresh process, as clean as an executor's own
    (``threads``: torch threads, None = torch's default); the JSON it prints last."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, os.path.abspath(__file__), *args] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_model_fresh(model_dir: str, batch_size: int, images: int, threads=None) -> dict:
    """raw_model in a fresh process: {"rate": images/s, "threads": torch threads}."""
    return in_fresh_process("--raw-child", model_dir, "--batch-size", str(batch_size), "--images", str(images),
                            threads=threads)


def encoder_alone(model_dir: str, paths, warm, batch_size: int, request_size: int) -> float:
    """images/s of the CLIPImageEncoder executor itself (decode pool ahead of the model, draft decode),
    called in this process on requests of ``request_size`` photos: no gRPC, no gateway, no indexer."""
    from docarray import DocList

    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.docs import ImageInput
    from executors.imaging import path_uri

    def request(part):
        return DocList[ImageInput]([ImageInput(uri=path_uri(p), url=path_uri(p)) for p in part])

    encoder = CLIPImageEncoder(pretrained_model_name_or_path=model_dir, device="cpu", batch_size=batch_size)
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


def encoder_alone_fresh(model_dir: str, paths, warm, batch_size: int, request_size: int, threads=None) -> float:
    """encoder_alone in a fresh process (the executor's own, as in a flow, without the flow)."""
    import json

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"paths": list(paths), "warm": list(warm)}, f)
    try:
        return in_fresh_process("--encoder-child", model_dir, "--photo-list", f.name, "--batch-size", str(batch_size),
                                "--request-size", str(request_size), threads=threads)["rate"]
    finally:
        os.unlink(f.name)


def overlap_ceiling(model_seconds: float, prepare_seconds: float, threads: int, cpus: int) -> float:
    """The most (b)/(a) can be on ``cpus`` CPUs if decoding overlapped the model perfectly: the model
    takes ``threads`` x ``model_seconds`` of CPU per image, reading + decoding + preprocessing
    ``prepare_seconds`` of CPU; the flow can neither beat the raw model nor use more than every CPU."""
    per_image_cpu = threads * model_seconds + prepare_seconds
    return min(1.0, cpus * model_seconds / per_image_cpu)


def stage_split(clip, paths, batch_size: int, draft: bool, store_dir: str):
    """Seconds per image of each stage, run one after the other in this process (no overlap)."""
    from executors.clip_image_encoder import DRAFT_FACTOR
    from executors.clip_model import image_embeddings
    from executors.imaging import Preprocess, decode_image, preprocess, read_source
    from executors.vector_store import Record, VectorStore

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
    from executors.clip_model import image_embeddings
    from executors.imaging import Preprocess, decode_image, preprocess

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
    from executors.clip_model import image_embeddings
    from executors.imaging import Preprocess, decode_image, preprocess

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
    parser.add_argument("--split-images", type=int, default=64, help="photos for the serial per-stage split and the draft cosine (default 64)")
    parser.add_argument("--modes", default="full,draft", help="decode modes to run end to end: full, draft or both (default both)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"),
                        help="photos and the model are cached here between runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the raw model (default: torch's default, as in the executor)")
    parser.add_argument("--raw-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--photo-list", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encoder_child:
        import json

        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        with open(args.photo_list) as f:
            listed = json.load(f)
        rate = encoder_alone(args.encoder_child, listed["paths"], listed["warm"], args.batch_size, args.request_size)
        print(json.dumps({"rate": rate}))
        return
    if args.raw_child:
        import json

        import torch

        from executors.clip_model import load_clip

        if args.threads:
            torch.set_num_threads(args.threads)
        rate = raw_model(load_clip(args.raw_child, "cpu", "float32"), args.batch_size, args.images)
        print(json.dumps({"rate": rate, "threads": torch.get_num_threads()}))
        return

    import torch

    from executors.clip_model import load_clip
    from executors.params import usable_cpus
    from flows.client import ClipseekClient
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    photos = make_photos(os.path.join(args.work_dir, "photos"), args.images + args.batch_size, seed=0)
    warm, photos = photos[: args.batch_size], photos[args.batch_size :]
    model_dir = make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))
    mb = sum(os.path.getsize(p) for p in photos) / 2**20
    for path in warm + photos:  # every path below then reads the files from the page cache, not the disk
        with open(path, "rb") as f:
            f.read()
    print(f"{len(photos)} photos ({mb:.0f} MiB of JPEG, {mb / len(photos):.2f} MiB each on average), model ready "
          f"in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, float32, batch {args.batch_size}")

    first = raw_model_fresh(model_dir, args.batch_size, args.images, args.threads)
    one = raw_model_fresh(model_dir, args.batch_size, args.images, 1) if first["threads"] != 1 else first
    raw, threads = first["rate"], first["threads"]
    print(f"(a) raw model: {raw:.2f} images/s with {threads} torch threads ({one['rate']:.2f} with 1)")
    clip = load_clip(model_dir, "cpu", "float32")

    split_paths = photos[: args.split_images]
    splits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "draft"):
            splits[mode], _ = stage_split(clip, split_paths, args.batch_size, mode == "draft", os.path.join(tmp, mode))
    cosines = {f: draft_cosines(clip, split_paths, f) for f in (1, 2)}
    between = photo_to_photo_cosine(clip, split_paths)
    del clip

    alone = encoder_alone_fresh(model_dir, photos, warm, args.batch_size, args.request_size, args.threads)
    print(f"(c) CLIPImageEncoder alone, in a process of its own (draft decode): {alone:.2f} images/s")
    cpus = usable_cpus()

    results = {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model_dir,
                            device="cpu", dtype="float32", batch_size=args.batch_size, workspace=workspace)
        with flows_in_subprocess(settings):
            client = ClipseekClient(settings.index_address, settings.search_address)
            for mode in modes:  # warm up each path once (first model call, first decode)
                client.index(warm, batch_size=args.batch_size, force=True, parameters={"draft_decode": mode == "draft"})
            for mode in modes:
                t0 = time.perf_counter()
                report = client.index(photos, batch_size=args.request_size, force=True,
                                      parameters={"draft_decode": mode == "draft"})
                elapsed = time.perf_counter() - t0
                if len(report.indexed) != len(photos):
                    raise SystemExit(f"{mode}: indexed {len(report.indexed)} of {len(photos)}: {report.failed[:3]}")
                results[mode] = len(photos) / elapsed
            status = client.status()
            print(f"index holds {status.count} vectors, {status.bytes_on_disk / 2**20:.1f} MiB on disk")
    raw_after = raw_model_fresh(model_dir, args.batch_size, args.images, args.threads)["rate"]  # the VM drifts: (a) on both sides
    print(f"(a) raw model again, after the flow runs: {raw_after:.2f} images/s")
    raw = max(raw, raw_after)
    best = max(raw, one["rate"])

    print()
    print(f"Throughput, {len(photos)} photos, batch {args.batch_size}, {args.request_size} per request, float32, cpu; "
          f"the executor runs torch's default of {threads} threads")
    rows = [[f"(a) raw model on ready tensors, {threads} threads (the faster of before / after)", f"{raw:.2f}", "1.00", f"{raw / best:.2f}"],
            ["(a') raw model on ready tensors, 1 thread", f"{one['rate']:.2f}", f"{one['rate'] / raw:.2f}", f"{one['rate'] / best:.2f}"]]
    rows.append(["(c) CLIPImageEncoder alone (decode pool + model, no gRPC / indexer), draft decode", f"{alone:.2f}",
                 f"{alone / raw:.2f}", f"{alone / best:.2f}"])
    for mode in modes:
        rows.append([f"(b) index flow over gRPC, {mode} decode", f"{results[mode]:.2f}", f"{results[mode] / raw:.2f}",
                     f"{results[mode] / best:.2f}"])
    print(table(["path", "images/s", "/ (a)", "/ best raw"], rows))
    print()
    print(f"The most (b)/(a) can reach on {cpus} CPUs with perfect overlap (model CPU = {threads} threads x 1/(a); "
          f"read + decode + preprocess CPU from the split below):")
    rows = []
    for mode in ("full", "draft"):
        prepare = sum(splits[mode][k] for k in ("read", "decode", "preprocess"))
        rows.append([mode, f"{1000 * prepare:.1f}", f"{1000 * threads / raw:.1f}",
                     f"{overlap_ceiling(1 / raw, prepare, threads, cpus):.2f}"])
    print(table(["decode", "read + decode + preprocess, ms CPU per image", "model, ms CPU per image", "ceiling of (b)/(a)"], rows))

    print()
    print(f"Per-stage split, ms per image, stages run one after the other on {len(split_paths)} photos (no overlap)")
    rows = []
    for mode in ("full", "draft"):
        s = splits[mode]
        total = sum(s.values())
        rows.append([mode] + [f"{1000 * s[k]:.1f} ({100 * s[k] / total:.0f}%)" for k in ("read", "decode", "preprocess", "model", "write")]
                    + [f"{1000 * total:.1f}", f"{s['model'] / total:.2f}"])
    print(table(["decode", "read", "decode", "preprocess", "model", "write", "total", "model share (ceiling of (b)/(a) on a full CPU)"], rows))

    print()
    print(f"What draft decoding costs: embeddings of the same {len(split_paths)} photos, draft vs full decode "
          f"(for scale: two different photos score {between:.4f} on average with this random-weight model)")
    rows = [[f"draft, short side >= {f}x the resize target", f"{c[0]:.6f}", f"{1 - c[1]:.1e}", f"{c[2]:.4f}"] for f, c in cosines.items()]
    print(table(["decode", "mean cosine to full decode", "worst 1 - cosine", "mean abs pixel diff (normalized units)"], rows))


if __name__ == "__main__":
    main()
