"""Latency of one text query through the gRPC search flow at 10k, 100k and 1M indexed vectors,
next to the text encoder alone, the VectorStore scan alone, numpy brute force and faiss
IndexFlatIP on the same vectors, all in one run.

    python benchmarks/search_latency.py               # 10k, 100k, 1M (needs ~7 GiB RAM, a few minutes)
    python benchmarks/search_latency.py --skip-1m     # 10k and 100k only
    python benchmarks/search_latency.py --sizes 10000,250000 --queries 200
    python benchmarks/search_latency.py --precisions float32,bfloat16,int8,auto --sizes 10000   # side by side

With ``--precisions`` the run first serves the flows once per precision at the smallest size and prints
each one's served query, its text encoder alone, and the cosine of its query embeddings to float32's; the
served queries take turns with the torch float32 text tower alone, so their ratio is of the same minutes.
A named precision runs the text tower on torch; ``auto`` runs it as the server's default does (on a CPU
with onnxruntime installed: ONNX Runtime, in int8 where that measures faster and keeps the embeddings, else
float32), so its row compares that with torch float32 alone.

The vectors are random unit vectors written straight into the search flow's VectorStore folder
under the model name the text encoder reports, so the flow searches them as a real index.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List

import numpy as np

from common import Results, options_of, percentiles, table  # noqa: E402  (sets sys.path and offline env)
from clipseek.demo.modelkit import make_vit_b32  # noqa: E402

WORDS = ("red green blue yellow black white small big cat dog car tree house beach sunset sky sea mountain city "
         "street flower food bird person people light dark photo of a the with near").split()


def query_texts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timings(fn, items, warmup: int = 3):
    """Seconds of ``fn(item)`` for each item, after ``warmup`` untimed calls."""
    for item in items[:warmup]:
        fn(item)
    out = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - t0)
    return out


def latencies(fn, items, warmup: int = 3):
    return percentiles(timings(fn, items, warmup))


def text_child(model_dir: str, queries: int, dtype: str = "float32") -> None:
    """In a fresh process (no other thread pool competing with torch's): the text encoder alone, as the
    search flow's CLIPTextEncoder runs it; prints its p50/p99 and the query embeddings as JSON."""
    import json

    from executors.models.loading import load_clip, text_embeddings

    clip = load_clip(model_dir, "cpu", dtype, with_tokenizer=True)
    texts = query_texts(queries)
    seconds = timings(lambda t: text_embeddings(clip, [t]), texts)
    p50, p99 = percentiles(seconds)
    vectors = [text_embeddings(clip, [t])[0].tolist() for t in texts]
    import torch

    print(json.dumps({"p50": p50, "p99": p99, "seconds": seconds, "vectors": vectors, "threads": torch.get_num_threads(),
                      "runtime": "onnxruntime" if clip.text_tower is not None else "torch", "precision": clip.precision}))


def encode_texts(model_dir: str, queries: int, dtype: str = "float32"):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--text-child", model_dir, "--queries", str(queries),
                          "--dtype", dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def numpy_top_k(data: np.ndarray, q: np.ndarray, k: int = 10):
    scores = data @ q
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part])]


# The served queries of a precision and the torch float32 text tower alone take turns this many times, each
# turn all the queries: on a shared VM whose speed drifts by tens of percent between minutes, the ratio of the
# two then compares figures of the same minutes.
TURNS = 3


def precision_table(model_dir: str, name: str, precisions, size: int, texts, reference, args, report: Results) -> None:
    """One served search flow per precision over the same ``size`` vectors: the query through the client,
    the text encoder alone in that precision, and how close its query embeddings are to float32's. The
    served queries alternate with runs of the torch float32 text tower alone (``TURNS``), and the ratio
    "served / float32 encoder" is of the two p50s over all turns."""
    from clipseek.client import ClipseekClient
    from executors.store.vector_store import Record, VectorStore
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    dim = len(next(iter(reference.values())))
    data = unit_rows(np.random.default_rng(0), size, dim)
    f32_seconds = []
    rows = []
    for dtype in precisions:
        encoded = encode_texts(model_dir, args.queries, dtype)
        vectors = np.asarray(encoded["vectors"], dtype=np.float32)
        cosines = (vectors * np.stack([reference[t] for t in texts])).sum(axis=1)
        with tempfile.TemporaryDirectory() as workspace:
            settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model_dir,
                                device="cpu", dtype=dtype, workspace=workspace)
            with flows_in_subprocess(settings):
                client = ClipseekClient(settings.index_address, settings.search_address)
                writer = VectorStore(client.status().path)
                try:
                    writer.upsert(data, [Record(id=f"v{i}", uri=f"/synthetic/{i}.jpg") for i in range(size)], model=name)
                finally:
                    writer.close()
                served, alone = [], []
                for _ in range(TURNS):
                    served += timings(lambda t: client.search(t, limit=args.limit), texts)
                    alone += encode_texts(model_dir, args.queries, "float32")["seconds"]
        flow, f32 = percentiles(served), percentiles(alone)
        f32_seconds += alone
        label = dtype if dtype != "auto" else f"auto: {encoded['runtime']} {encoded['precision']}"
        rows.append([label, f"{flow[0]:.2f} / {flow[1]:.2f}", f"{encoded['p50']:.2f} / {encoded['p99']:.2f}",
                     f"{f32[0]:.2f} / {f32[1]:.2f}", f"{flow[0] / encoded['p50']:.2f}", f"{flow[0] / f32[0]:.2f}",
                     f"{f32[0] / encoded['p50']:.2f}", f"{cosines.min():.5f}"])
        print(table(HEADERS, rows[-1:]), flush=True)
    report.table(f"One text query by precision, {size:,} vectors, top-{args.limit}, p50 / p99 ms ({args.queries} queries "
                 f"{TURNS} times, each time followed by the torch float32 text encoder alone on the same queries: "
                 f"p50 {percentiles(f32_seconds)[0]:.2f} ms over all of them)", HEADERS, rows)


def stages(address: str, texts, limit: int) -> Dict[str, List[float]]:
    """Where one served text query's time goes, in seconds per query: the client's whole call, then what jina
    records in the answer's routes (the gateway from receiving the request to answering it; each executor from
    the gateway's send to its answer), as the client sends a text query (past the image encoder)."""
    from docarray import DocList

    from clipseek.client import TEXT_ONLY_ROUTE
    from executors.docs import TextQuery
    from flows.transport import GrpcTransport

    transport = GrpcTransport()
    out: Dict[str, List[float]] = {}
    try:
        for i, text in enumerate([*texts[:3], *texts]):
            t0 = time.perf_counter()
            answer = transport.request(address, "/search", DocList[TextQuery]([TextQuery(text=text)]), DocList[TextQuery],
                                       {"limit": limit}, target_executor=TEXT_ONLY_ROUTE)
            took = time.perf_counter() - t0
            if i < 3:
                continue  # warm-up
            out.setdefault("client", []).append(took)
            for route in answer.routes:
                if route.end_time.ToNanoseconds() > 0:  # an executor the query skipped has no end
                    seconds = (route.end_time.ToNanoseconds() - route.start_time.ToNanoseconds()) / 1e9
                    out.setdefault(route.executor, []).append(seconds)
    finally:
        transport.close()
    return out


def stage_rows(seconds: Dict[str, List[float]]) -> List[List[str]]:
    """The table of ``stages``: each part's p50, and what lies between them (the client's side and the
    transport to the gateway; the gateway's own work between its executors)."""
    p50 = {name: float(np.median(values)) * 1e3 for name, values in seconds.items()}
    executors = [name for name in p50 if name not in ("client", "gateway")]
    total = p50["client"]
    rows = [["whole query, as the client sees it", f"{total:.2f}", "1.00"]]
    parts = [("client side and client <-> gateway transport", total - p50.get("gateway", total))]
    parts += [(f"executor {name} (gateway's send to its answer)", p50[name]) for name in executors]
    if "gateway" in p50:
        parts.append(("gateway's own work around its executors", p50["gateway"] - sum(p50[n] for n in executors)))
    rows += [[label, f"{ms:.2f}", f"{ms / total:.2f}"] for label, ms in parts]
    return rows


STAGE_HEADERS = ["part of a served text query", "p50 ms", "share of the whole"]


HEADERS = ["precision", "served query (client, gRPC, flow)", "text encoder alone",
           "float32 encoder alone, between the served runs", "served / its encoder", "served / float32 encoder",
           "float32 encoder / this encoder", "min cosine to float32"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="index sizes (default 10k, 100k, 1M)")
    parser.add_argument("--skip-1m", action="store_true", help="leave out sizes of a million and more")
    parser.add_argument("--queries", type=int, default=100, help="timed queries per method and size (default 100)")
    parser.add_argument("--limit", type=int, default=10, help="top-k (default 10)")
    parser.add_argument("--precisions", default="", help="e.g. float32,bfloat16,int8: serve each at the smallest size first")
    parser.add_argument("--dtype", default="auto", help="precision of the size sweep's flow and its text encoder (default auto)")
    parser.add_argument("--text-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"),
                        help="the model is cached here between runs")
    args = parser.parse_args()
    if args.text_child:
        text_child(args.text_child, args.queries, args.dtype)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.skip_1m:
        sizes = [s for s in sizes if s < 1_000_000]

    import faiss

    report = Results(__file__, options_of(args, hide=("text_child",)))
    from executors.models.loading import model_id
    from executors.store.vector_store import Record, VectorStore
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    model_dir = make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))
    name = model_id(model_dir)
    texts = query_texts(args.queries)
    encoded = encode_texts(model_dir, args.queries, "float32")
    qvec = {t: np.asarray(v, dtype=np.float32) for t, v in zip(texts, encoded["vectors"])}
    dim = len(next(iter(qvec.values())))
    print(f"{os.cpu_count()} CPUs; torch {encoded['threads']} threads, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), numpy {np.__version__}; {dim}-d float32, top-{args.limit}, "
          f"{args.queries} queries per cell")

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if precisions:
        precision_table(model_dir, name, precisions, sizes[0], texts, qvec, args, report)

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as workspace:
        settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model_dir,
                            device="cpu", dtype=args.dtype, workspace=workspace)
        with flows_in_subprocess(settings):
            client = ClipseekClient(settings.index_address, settings.search_address)
            store_dir = client.status().path  # the folder both flows' indexers use
            writer = VectorStore(store_dir)
            data = np.zeros((0, dim), np.float32)
            try:
                for size in sizes:
                    t0 = time.perf_counter()
                    for start in range(len(data), size, 100_000):
                        part = unit_rows(rng, min(100_000, size - start), dim)
                        writer.upsert(part, [Record(id=f"v{start + i}", uri=f"/synthetic/{start + i}.jpg") for i in range(len(part))],
                                      model=name)
                        data = np.concatenate([data, part])
                    print(f"{size} vectors in the store ({time.perf_counter() - t0:.0f} s to add)", flush=True)

                    reader = VectorStore(store_dir)  # a reader of its own, as the search flow's indexer is
                    index = faiss.IndexFlatIP(dim)
                    index.add(data)

                    # same answers from every exact method
                    q = qvec[texts[0]]
                    want = numpy_top_k(data, q, args.limit)
                    got_store = [int(r.id[1:]) for r, _ in reader.search(q, limit=args.limit)[0]]
                    got_faiss = index.search(q[None], args.limit)[1][0]
                    got_flow = [int(h.id[1:]) for h in client.search(texts[0], limit=args.limit)]
                    assert list(want) == got_store == list(got_faiss), (want, got_store, got_faiss)
                    # the flow embeds the query in its own precision: the same rows, in float32 the same order
                    if args.dtype == "float32":
                        assert got_flow == list(want), (want, got_flow)
                    else:
                        assert len(set(got_flow) & set(want)) >= 0.8 * args.limit, (want, got_flow)

                    flow = latencies(lambda t: client.search(t, limit=args.limit), texts)
                    if size == sizes[0]:
                        parts = stage_rows(stages(settings.search_address, texts, args.limit))
                        print(table(STAGE_HEADERS, parts), flush=True)
                        report.table(f"Where a served text query's time goes, {size:,} vectors, top-{args.limit}, dtype "
                                     f"{args.dtype} ({args.queries} queries; p50 of each part, as jina's routes record "
                                     f"them, so the parts need not add up to the whole)", STAGE_HEADERS, parts)
                    encoded = encode_texts(model_dir, args.queries, args.dtype)  # again, next to this size's other figures
                    text = encoded["p50"], encoded["p99"]
                    store = latencies(lambda t: reader.search(qvec[t], limit=args.limit), texts)
                    brute = latencies(lambda t: numpy_top_k(data, qvec[t], args.limit), texts)
                    flat = latencies(lambda t: index.search(qvec[t][None], args.limit), texts)
                    rows.append([f"{size:,}", *(f"{p50:.2f} / {p99:.2f}" for p50, p99 in (flow, text, store, brute, flat)),
                                 f"{flow[0] / text[0]:.2f}", f"{flow[0] / (text[0] + store[0]):.2f}", f"{store[0] / flat[0]:.2f}"])
                    print(table(["vectors", "gRPC search flow", "text encoder alone", "VectorStore.search", "numpy brute force",
                                 "faiss IndexFlatIP", "flow / text enc.", "flow / (text enc. + store)", "store / faiss"], rows[-1:]), flush=True)
                    reader.close()
                    index.reset()  # frees its copy of the vectors before the next size
            finally:
                writer.close()

    report.table(f"p50 / p99 latency in ms of one query, top-{args.limit}, {dim}-d float32 vectors ({args.queries} queries "
                 f"per cell; the flow and the text encoder in dtype {args.dtype}, torch {encoded['threads']} threads)",
                 ["vectors", "gRPC search flow", "text encoder alone", "VectorStore.search", "numpy brute force",
                  "faiss IndexFlatIP", "flow / text enc.", "flow / (text enc. + store)", "store / faiss"], rows)
    report.write()


if __name__ == "__main__":
    main()
