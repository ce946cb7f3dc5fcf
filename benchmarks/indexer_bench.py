"""VectorStore on its own: bulk insert rows/s, exact top-10 scan time (float32 and float16
storage, several chunk sizes), recall@10 of float16 against float32, and the private memory of a
process searching 1M x 512, read from /proc/self/smaps_rollup, to show the memory map is searched
in place and never copied into RAM.

    python benchmarks/indexer_bench.py                    # 1M x 512, float32 and float16 (~5 GiB disk in /tmp)
    python benchmarks/indexer_bench.py --rows 200000 --dtypes float32
    python benchmarks/indexer_bench.py --sweep 4096,16384,65536,262144   # chunk sizes to compare
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import ROOT, Results, options_of, percentiles  # noqa: E402  (sets sys.path and offline env)

SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous")


def smaps_rollup() -> dict:
    """kB per field of /proc/self/smaps_rollup."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in SMAPS_FIELDS:
                out[key] = int(rest.split()[0])
    return out


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def fill(path: str, rows: int, dim: int, batch: int, dtype: str) -> float:
    """Insert ``rows`` random unit vectors (the same ones for every dtype); returns rows/s of upsert alone."""
    from executors.store.vector_store import Record, VectorStore

    store = VectorStore(path, dtype=dtype)
    rng = np.random.default_rng(0)
    spent = 0.0
    try:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            vectors = unit_rows(rng, n, dim)
            records = [Record(id=f"v{start + i}", uri=f"/synthetic/{start + i}.jpg", width=640, height=480)
                       for i in range(n)]
            t0 = time.perf_counter()
            store.upsert(vectors, records, model="bench")
            spent += time.perf_counter() - t0
    finally:
        store.close()
    return rows / spent


def child(path: str, queries: int, sweep: list, scans: list, limit: int) -> None:
    """Runs in a fresh process: open the store, search, report times, answers and memory as JSON."""
    from executors.store.vector_store import VectorStore

    if "torch" in scans or "auto" in scans:
        import torch  # noqa: F401  (imported before the baseline: its libraries are not the search's memory)
    report = {"before_open": smaps_rollup()}
    store = VectorStore(path)
    dim = store.dim
    qs = unit_rows(np.random.default_rng(1), queries, dim)
    report["after_open"] = smaps_rollup()
    store.search(qs[0], limit=limit)  # maps the file and reads the live rows
    times = {}
    default_rows, default_f16_rows = store.chunk_rows, store.f16_chunk_rows
    for scan in scans:
        for chunk in sweep:
            store.scan = scan
            store.chunk_rows, store.f16_chunk_rows = chunk or default_rows, chunk or default_f16_rows
            store.search(qs[0], limit=limit)
            spent = []
            for q in qs:
                t0 = time.perf_counter()
                store.search(q, limit=limit)
                spent.append(time.perf_counter() - t0)
            times[f"{scan} {chunk}"] = percentiles(spent)
    report["after_search"] = smaps_rollup()
    report["times"] = times
    report["answers"] = [[r.id for r, _ in store.search(q, limit=limit)[0]] for q in qs]
    report["dtype"] = store.dtype
    report["file_mib"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("vectors.")) / 2**20
    report["view_mib"] = store._view.nbytes / 2**20
    report["view_is_memmap"] = isinstance(store._view, np.memmap)
    store.close()
    print(json.dumps(report))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="vectors in the store (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="dimensions (default 512)")
    parser.add_argument("--insert-batch", type=int, default=10_000, help="rows per upsert (default 10,000)")
    parser.add_argument("--queries", type=int, default=30, help="timed queries per setting (default 30)")
    parser.add_argument("--limit", type=int, default=10, help="top-k (default 10)")
    parser.add_argument("--dtypes", default="float32,float16", help="storage dtypes (default float32,float16)")
    parser.add_argument("--sweep", default="", help="chunk sizes (rows) to time, comma separated (default: the store's defaults)")
    parser.add_argument("--scans", default="auto,torch,numpy", help="what multiplies the chunks: auto (the store's default), torch, numpy")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sweep = [int(s) for s in args.sweep.split(",") if s.strip()] or [0]
    scans = [s.strip() for s in args.scans.split(",") if s.strip()]
    if args.child:
        child(args.child, args.queries, sweep, scans, args.limit)
        return

    import faiss

    printed = Results(__file__, options_of(args, hide=("child",)))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"{os.cpu_count()} CPUs, numpy {np.__version__}, {args.rows:,} x {args.dim} random unit vectors, "
          f"upserts of {args.insert_batch:,}, top-{args.limit}, {args.queries} queries per cell", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {}
        for dtype in dtypes:
            path = os.path.join(tmp, dtype)
            rate = fill(path, args.rows, args.dim, args.insert_batch, dtype)
            report = None
            for scan in scans:  # a fresh process per scan, so that thread pools never compete
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--queries", str(args.queries),
                                      "--limit", str(args.limit), "--sweep", ",".join(map(str, sweep)), "--scans", scan],
                                     capture_output=True, text=True, cwd=ROOT, check=True)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                if report is None:
                    report = got
                else:
                    report["times"].update(got["times"])
            report["insert_rate"] = rate
            results[dtype] = report
            print(f"{dtype}: inserted at {rate:,.0f} rows/s; searched", flush=True)

        # faiss on the same vectors and queries, for scale
        rng = np.random.default_rng(0)
        index = faiss.IndexFlatIP(args.dim)
        for start in range(0, args.rows, args.insert_batch):
            index.add(unit_rows(rng, min(args.insert_batch, args.rows - start), args.dim))
        qs = unit_rows(np.random.default_rng(1), args.queries, args.dim)
        index.search(qs[:1], args.limit)
        spent = []
        for q in qs:
            t0 = time.perf_counter()
            index.search(q[None], args.limit)
            spent.append(time.perf_counter() - t0)
        faiss_p50, faiss_p99 = percentiles(spent)
        faiss_ids = [[f"v{i}" for i in row] for row in index.search(qs, args.limit)[1]]
        del index

    rows = []
    for dtype, r in results.items():
        recall = np.mean([len(set(a) & set(b)) / args.limit for a, b in zip(r["answers"], faiss_ids)])
        for setting, (p50, p99) in r["times"].items():
            scan, chunk = setting.split()
            chunk = {"0": "default"}.get(chunk, chunk)
            rows.append([dtype, f"{r['file_mib']:.0f}", f"{r['insert_rate']:,.0f}", scan, chunk, f"{p50:.1f} / {p99:.1f}",
                         f"{p50 / faiss_p50:.2f}", f"{recall:.4f}"])
    printed.table(f"Bulk insert and exact top-{args.limit} scan, {args.rows:,} x {args.dim}, upserts of {args.insert_batch:,} "
                 f"rows (p50 / p99 ms per query, {args.queries} queries; faiss IndexFlatIP on the same vectors: "
                 f"{faiss_p50:.1f} / {faiss_p99:.1f} ms)",
                 ["storage", "vectors file MiB", "insert rows/s", "scan", "chunk rows", "search ms", "/ faiss",
                  "recall@10 vs float32 exact"], rows)

    rows = []
    for dtype, r in results.items():
        for stage in ("after_open", "after_search"):
            rows.append([dtype, stage.replace("_", " "), *(f"{r[stage][k]:,}" for k in SMAPS_FIELDS)])
        grown = {k: r["after_search"][k] - r["after_open"][k] for k in SMAPS_FIELDS}
        rows.append([dtype, "grown while searching", *(f"{grown[k]:+,}" for k in SMAPS_FIELDS)])
    notes = []
    for dtype, r in results.items():
        grown_anon = (r["after_search"]["Anonymous"] - r["after_open"]["Anonymous"]) / 1024
        notes.append(f"{dtype}: the map covers {r['view_mib']:.0f} MiB (np.memmap: {r['view_is_memmap']}); anonymous "
                     f"memory grew {grown_anon:.1f} MiB while searching.")
    notes.append("Rss / Private_Clean grow by the file pages the scan touched: page cache mapped by this process only, "
                 "counted as 'private clean', not a copy, dropped by the kernel under pressure.")
    printed.table("Memory of a fresh process searching the store (kB from /proc/self/smaps_rollup)",
                 ["storage", "when", *SMAPS_FIELDS], rows, note=" ".join(notes))
    printed.write()


if __name__ == "__main__":
    main()
