"""Scale-out: what 1, 2 and 4 indexer shards cost at 1M x 512, and what a bigger index needs.

    python benchmarks/shard_scale.py                               # 1M vectors; 1, 2, 4 shards; 10M sizing (~5 min on 2 vCPUs, 7 GiB of disk)
    python benchmarks/shard_scale.py --vectors 200000 --shards 1,2 --skip-flow
    python benchmarks/shard_scale.py --target-vectors 50000000 --target-shards 16,32,64

Random 512-d float32 unit vectors (ids ``v0``, ``v1``, ...) are written with ``VectorStore.upsert`` in big
batches, once per shard count N, into ``<tmp>/ws<N>/SimpleIndexer/<k>``: the workspace layout jina gives
shard k, each shard holding the ids ``executors.simple_indexer.shard_of`` assigns it, under the text
encoder's model name. Then, for each N:

- each shard alone, in a fresh process (as a pod of its own would run it, on all of this machine's CPUs):
  the exact top-k scan, p50 / p99 over ``--queries`` queries; the store's bytes on disk; the process's
  resident memory while searching (Rss, and of it the anonymous memory, from /proc/self/smaps_rollup);
- the merge of those shards' real answers by ``ShardMerger.search`` (what the flow's merger runs), p50 /
  p99, and whether it gives exactly the top-k of one shard over all the vectors;
- one text query end to end through the jina flows serving that workspace with N shards (the topology
  ``clipseek export`` writes, ``flows/cluster.py``: every shard one process, reached by the search flow over
  gRPC; ``--topology serve`` for ``clipseek serve``'s), p50 / p99 over ``--flow-queries``, and the resident
  memory of each shard's process after them. All of the flows share this machine's CPUs.

From the per-shard figures it prints what ``--target-vectors`` (10M) need for each of ``--target-shards``.
The text encoder is ViT-B/32 shaped with random weights (``clipseek.demo.modelkit.make_vit_b32``): the
speed is the real model's, the embeddings mean nothing.
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

SMAPS_FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous")
WORDS = ("red green blue yellow black white small big cat dog car tree house beach sunset sky sea mountain city "
         "street flower food bird person people light dark photo of a the with near").split()
MIB = 2**20


def unit_rows(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def query_texts(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]


def smaps_rollup(pid="self") -> dict:
    """kB per field of /proc/<pid>/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in SMAPS_FIELDS:
                out[key] = int(rest.split()[0])
    return out


def mapped_kb(pid, path: str) -> int:
    """kB of ``path``'s pages resident in process ``pid``'s memory (its Rss in /proc/<pid>/smaps)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: address range ... path
                inside = line.rstrip("\n").endswith(" " + path)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def descendants(pid: int) -> list:
    """Every process below ``pid`` (children, their children, ...)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def maps_file(pid: int, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip("\n").endswith(" " + path) for line in f)
    except OSError:
        return False


def shard_dir(base: str, shards: int, k: int) -> str:
    return os.path.join(base, f"ws{shards}", "SimpleIndexer", str(k))


def build(base: str, layouts, vectors: int, dim: int, batch: int, model: str):
    """Write the same ``vectors`` into one workspace per shard count; {shards: rows/s of the upserts}."""
    from executors.simple_indexer import shard_of
    from executors.store.vector_store import Record, VectorStore

    stores = {n: [VectorStore(shard_dir(base, n, k)) for k in range(n)] for n in layouts}
    spent = dict.fromkeys(layouts, 0.0)
    try:
        for n, group in stores.items():
            for k, store in enumerate(group):
                store.check_shards(k, n)
        for start in range(0, vectors, batch):
            count = min(batch, vectors - start)
            rows = unit_rows(np.random.default_rng([0, start]), count, dim)
            records = [Record(id=f"v{start + i}", uri=f"/synthetic/{start + i}.jpg", width=640, height=480)
                       for i in range(count)]
            for n, group in stores.items():
                owner = np.fromiter((shard_of(r.id, n) for r in records), dtype=np.int64, count=count) if n > 1 \
                    else np.zeros(count, np.int64)
                t0 = time.perf_counter()
                for k, store in enumerate(group):
                    mine = np.flatnonzero(owner == k)
                    store.upsert(rows[mine], [records[i] for i in mine], model=model)
                spent[n] += time.perf_counter() - t0
            print(f"  {start + count:,} of {vectors:,} vectors written", flush=True)
    finally:
        for group in stores.values():
            for store in group:
                store.close()
    return {n: vectors / s for n, s in spent.items()}


def scan_child(path: str, queries: int, limit: int, dim: int) -> None:
    """In a fresh process: open one shard's store, search it, print times, answers and memory as JSON."""
    from executors.store.vector_store import VectorStore

    before = smaps_rollup()
    store = VectorStore(path, read_only=True)
    qs = unit_rows(np.random.default_rng(1), queries, dim)
    store.search(qs[0], limit=limit)  # maps the file, reads the live rows
    spent, answers = [], []
    for q in qs:
        t0 = time.perf_counter()
        hits = store.search(q, limit=limit)[0]
        spent.append(time.perf_counter() - t0)
        answers.append([(r.id, s) for r, s in hits])
    p50, p99 = percentiles(spent)
    print(json.dumps({"p50": p50, "p99": p99, "answers": answers, "count": store.count, "disk": store.bytes_on_disk(),
                      "vectors_file": os.path.getsize(os.path.join(path, "vectors.f32")),
                      "before": before, "after": smaps_rollup()}))
    store.close()


def scan_shard(path: str, args) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--scan-child", path, "--queries", str(args.queries),
                          "--limit", str(args.limit), "--dim", str(args.dim)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_times(per_shard_answers, limit: int):
    """p50 / p99 ms of ShardMerger.search over the shards' real answers, one query at a time, each answer as a
    shard sends it (ended with its shard's mark where the indexer marks its answers); the merged ids."""
    from docarray import DocList

    from executors import shard_merger
    from executors.docs import Hit, TextQuery

    shards = len(per_shard_answers)
    mark = getattr(shard_merger, "mark_answer", None)
    merger = shard_merger.ShardMerger(limit=limit, **({"shards": shards} if mark else {}))
    spent, merged = [], []
    for position in range(len(per_shard_answers[0])):
        matrix = [DocList[TextQuery]([TextQuery(id=f"q{position}", text="query", matches=DocList[Hit](
            [Hit(id=i, uri=f"/synthetic/{i[1:]}.jpg", score=s) for i, s in answers[position]]))])
            for answers in per_shard_answers]
        if mark:
            matrix = [mark(answer, DocList[TextQuery], k, shards) for k, answer in enumerate(matrix)]
        t0 = time.perf_counter()
        answer = merger.search(matrix[0], parameters={"limit": limit}, docs_matrix=matrix)
        spent.append(time.perf_counter() - t0)
        merged.append([m.id for m in answer[0].matches])
    return percentiles(spent), merged


def served(base: str, shards: int, model_dir: str, args, texts):
    """One text query end to end through the flows serving ``ws<shards>``: (p50, p99) ms, the answers' ids,
    seconds to start, {shard: kB of Rss, kB of it its vectors file} of each shard's process, and the Rss kB
    of the flows' other processes."""
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    workspace = os.path.join(base, f"ws{shards}")
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=model_dir,
                        device="cpu", dtype=args.dtype, workspace=workspace, shards=shards)
    if args.topology == "cluster":
        from flows.cluster import shared_flows_in_subprocess as serve
    else:
        serve = flows_in_subprocess
    t0 = time.perf_counter()
    with serve(settings, timeout=600):
        started = time.perf_counter() - t0
        client = ClipseekClient(settings.index_address, settings.search_address)
        for text in texts[:3]:
            client.search(text, limit=args.limit)
        spent, answers = [], []
        for text in texts:
            t1 = time.perf_counter()
            hits = client.search(text, limit=args.limit)
            spent.append(time.perf_counter() - t1)
            answers.append([h.id for h in hits])
        procs = descendants(os.getpid())
        shard_mem, others = {}, 0
        files = {k: os.path.join(shard_dir(base, shards, k), "vectors.f32") for k in range(shards)}
        for pid in procs:
            try:
                rss = smaps_rollup(pid)["Rss"]
            except (OSError, KeyError):
                continue
            owner = next((k for k, f in files.items() if maps_file(pid, f)), None)
            if owner is None:
                others += rss
            elif rss > shard_mem.get(owner, (0, 0))[0]:
                shard_mem[owner] = (rss, mapped_kb(pid, files[owner]))
        client.close()
    return percentiles(spent), answers, started, shard_mem, others, len(procs)


def default_dtype() -> str:
    """The text encoder's precision: bfloat16 where the CPU runs it natively (what ``auto`` picks there, fixed
    here so that every shard count runs the same one), else float32."""
    import torch

    return "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors in the index (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="dimensions (default 512)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts to measure (default 1,2,4)")
    parser.add_argument("--insert-batch", type=int, default=100_000, help="vectors per upsert batch (default 100,000)")
    parser.add_argument("--queries", type=int, default=100, help="timed scans per shard and merges (default 100)")
    parser.add_argument("--flow-queries", type=int, default=200, help="timed queries through the flows (default 200)")
    parser.add_argument("--limit", type=int, default=10, help="top-k (default 10)")
    parser.add_argument("--dtype", default=None, help="the text encoder's precision (default: bfloat16 on a CPU with "
                                                      "native bfloat16, else float32)")
    parser.add_argument("--topology", choices=("cluster", "serve"), default="cluster",
                        help="cluster: flows/cluster.py, one process per shard (default); serve: clipseek serve's flows")
    parser.add_argument("--skip-flow", action="store_true", help="leave out the queries through the flows")
    parser.add_argument("--small-index", type=int, default=1000,
                        help="also query the flows over one shard of this many vectors, whose scan is next to nothing: "
                             "what the text encoder, the gateway and the hops cost (default 1,000; 0: skip)")
    parser.add_argument("--target-vectors", type=int, default=10_000_000, help="the index to size (default 10,000,000)")
    parser.add_argument("--target-shards", default="4,8,16", help="shard counts to size it for (default 4,8,16)")
    parser.add_argument("--dir", default=None, help="where the workspaces go (default: a temporary folder, removed after)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"),
                        help="the model is cached here between runs")
    parser.add_argument("--scan-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scan_child:
        scan_child(args.scan_child, args.queries, args.limit, args.dim)
        return
    args.dtype = args.dtype or default_dtype()
    layouts = sorted({int(s) for s in args.shards.split(",") if s.strip()})
    targets = sorted({int(s) for s in args.target_shards.split(",") if s.strip()})

    from clipseek.demo.modelkit import make_vit_b32
    from executors.models.loading import model_id

    report = Results(__file__, options_of(args, hide=("scan_child",)))
    model_dir = make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))
    texts = query_texts(args.flow_queries)
    print(f"{args.vectors:,} x {args.dim} float32 vectors into {', '.join(map(str, layouts))} shard(s); "
          f"top-{args.limit}; text encoder {args.dtype}", flush=True)
    per, flows = {}, {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="shard-scale-") as base:
        t0 = time.perf_counter()
        rates = build(base, layouts, args.vectors, args.dim, args.insert_batch, model_id(model_dir))
        print(f"written in {time.perf_counter() - t0:.0f} s", flush=True)
        for n in layouts:
            per[n] = [scan_shard(shard_dir(base, n, k), args) for k in range(n)]
            print(f"{n} shard(s): scanned, p50 " + ", ".join(f"{s['p50']:.1f}" for s in per[n]) + " ms", flush=True)
        for n in layouts if not args.skip_flow else []:
            flows[n] = served(base, n, model_dir, args, texts)
            print(f"{n} shard(s) through the flows: p50 {flows[n][0][0]:.1f} ms (started in {flows[n][2]:.0f} s)",
                  flush=True)
        if not args.skip_flow and args.small_index:  # the flows' own cost: text encoder, gateway, hops
            small = os.path.join(base, "small")
            build(small, [1], args.small_index, args.dim, args.insert_batch, model_id(model_dir))
            flows["small"] = served(small, 1, model_dir, args, texts)
            print(f"1 shard of {args.small_index:,} vectors through the flows: p50 {flows['small'][0][0]:.1f} ms",
                  flush=True)

    # one shard over everything is the reference answer
    reference = [[i for i, _ in a] for a in per[1][0]["answers"]] if 1 in per else None
    shard_rows, layout_rows, merges = [], [], {}
    for n in layouts:
        for k, s in enumerate(per[n]):
            grown = {f: s["after"][f] - s["before"][f] for f in SMAPS_FIELDS}
            in_flow = flows.get(n, [None] * 4)[3] or {}
            flow_mem = f"{in_flow[k][0] / 1024:,.0f} ({in_flow[k][1] / 1024:,.0f})" if k in in_flow else "-"
            shard_rows.append([n, k, f"{s['count']:,}", f"{s['disk'] / MIB:,.0f}", f"{s['p50']:.1f} / {s['p99']:.1f}",
                               f"{s['after']['Rss'] / 1024:,.0f}", f"{grown['Anonymous'] / 1024:+,.1f}", flow_mem])
        if n > 1:
            merges[n] = merge_times([s["answers"] for s in per[n]], args.limit)
        (m50, m99), merged = merges.get(n, ((None, None), None))
        same_merge = "-" if reference is None or merged is None else f"{sum(a == b for a, b in zip(merged, reference))}/{len(reference)}"
        if n in flows:
            (f50, f99), answers, started, _, others, procs = flows[n]
            ref_flow = flows.get(1, [None, None])[1]
            same_flow = "-" if ref_flow is None else f"{sum(a == b for a, b in zip(answers, ref_flow))}/{len(answers)}"
            flow_cells = [f"{f50:.1f} / {f99:.1f}", same_flow, f"{started:.0f}", f"{procs} ({others / 2**20:.1f})"]
        else:
            flow_cells = ["-"] * 4
        slowest = max(per[n], key=lambda s: s["p50"])
        layout_rows.append([n, f"{slowest['p50']:.1f} / {slowest['p99']:.1f}",
                            "-" if m50 is None else f"{m50:.2f} / {m99:.2f}", same_merge, *flow_cells,
                            f"{sum(s['disk'] for s in per[n]) / MIB:,.0f}", f"{rates[n]:,.0f}"])
    if "small" in flows:
        (f50, f99), _, started, _, others, procs = flows["small"]
        layout_rows.append([f"1, {args.small_index:,} vectors", "-", "-", "-", f"{f50:.1f} / {f99:.1f}", "-",
                            f"{started:.0f}", f"{procs} ({others / 2**20:.1f})", "-", "-"])
    report.table(f"Per shard: {args.vectors:,} x {args.dim} float32 vectors split by `shard_of`; each shard scanned alone "
                 f"in a fresh process (exact top-{args.limit}, p50 / p99 ms over {args.queries} queries); memory in MiB",
                 ["shards", "shard", "vectors", "disk MiB", "scan p50 / p99 ms", "Rss while searching (store alone)",
                  "anonymous grown while searching", "shard process Rss in the flows (of it the vectors map)"],
                 shard_rows)
    report.table(f"Per shard count: the slowest shard's scan, the merge of the shards' answers (`ShardMerger.search`, "
                 f"{args.queries} queries), one text query end to end through the flows ({args.topology} topology, "
                 f"{args.flow_queries} queries, text encoder {args.dtype}, every process on this machine's CPUs); "
                 f"'= 1 shard': queries whose top-{args.limit} ids equal one shard's",
                 ["shards", "slowest shard scan ms", "merge ms", "merge = 1 shard", "query end to end ms",
                  "flow = 1 shard", "flows started in s", "flow processes (Rss GiB of the non-shard ones)",
                  "disk MiB in all", "upserts rows/s"], layout_rows)

    sizing(report, args, layouts, per, flows, merges, targets)
    report.write()


def sizing(report: Results, args, layouts, per, flows, merges, targets) -> None:
    """What ``args.target_vectors`` need with each of ``targets`` shards, from the per-shard figures."""
    # per vector, the median over every measured shard: disk (vectors + SQLite), and scan ms
    measured = [s for n in layouts for s in per[n]]
    disk_per_vector = float(np.median([s["disk"] / s["count"] for s in measured]))
    scan_per_vector = float(np.median([s["p50"] / s["count"] for s in measured]))
    vector_bytes = args.dim * 4
    biggest = max(layouts)
    fixed = hop = None
    if "small" in flows:  # text encoder, gateway and hops: a query end to end over next to no vectors
        fixed, fixed_from = flows["small"][0][0], f"one query end to end over one shard of {args.small_index:,} vectors"
    elif 1 in flows:
        fixed, fixed_from = flows[1][0][0] - per[1][0]["p50"], "the 1-shard query end to end less its scan"
    if 1 in flows and biggest > 1 and biggest in flows:
        hop = max(0.0, flows[biggest][0][0] - flows[1][0][0])
    runtimes = [(rss - mapped) for n in flows for rss, mapped in flows[n][3].values()]
    runtime_kb = max(runtimes) if runtimes else None  # a shard process without its vectors' pages
    others_kb = flows[biggest][4] if biggest in flows else None
    rows = []
    for target in targets:
        per_shard = -(-args.target_vectors // target)
        scan_ms = scan_per_vector * per_shard
        vectors_gib = per_shard * vector_bytes / 2**30
        memory_gib = vectors_gib + (runtime_kb / 2**20 if runtime_kb is not None else 0)
        latency = "-" if fixed is None else (f"{fixed + scan_ms + (hop or 0):.0f}" if target > 1 else f"{fixed + scan_ms:.0f}")
        rows.append([target, f"{per_shard:,}", f"{target} + {7 if target > 1 else 5}", f"{memory_gib:.1f}", f"{memory_gib * target:.1f}",
                     f"{disk_per_vector * per_shard / 2**30:.1f}", f"{scan_ms:.0f}", latency])
    notes = [f"Disk: {disk_per_vector:,.0f} bytes per vector as measured ({vector_bytes:,} of them the float32 vector, "
             f"the rest SQLite)."]
    if runtime_kb is not None:
        notes.append(f"Memory per shard pod: its vectors, kept in the page cache so that scans run at memory speed, plus "
                     f"{runtime_kb / 1024:,.0f} MiB, the Rss of the largest shard process in the flows less the pages of "
                     f"its vectors file.")
    notes.append(f"Scan: {scan_per_vector * 1e6:.1f} ms per million vectors (the median over the shards above of p50 "
                 f"per vector: the scan reads every vector once) on a pod with {os.cpu_count()} CPUs like this machine.")
    if fixed is not None:
        notes.append(f"Query p50: {fixed:.0f} ms of text encoder, gateway and hops ({fixed_from}) + the scan"
                     + (f" + {hop:.0f} ms for the merger's hop with more than one shard (the "
                     f"{biggest}-shard query end to end less the 1-shard one, 0 if less; both measured with every "
                     f"process of the flows on this machine's CPUs)" if hop is not None else "") + ".")
    notes.append("Pods: one per shard (a StatefulSet each, with its volume), and 7 others: each flow's gateway, the "
                 "index flow's image encoder and shard head, the search flow's text and image encoders and merger "
                 "(`clipseek export`; with one shard there is no head and no merger: 5); encoders scale with queries "
                 "and indexing, not with the index.")
    if others_kb is not None:
        notes.append(f"Those 7 (and the process holding the flows) took {others_kb / 2**20:.1f} GiB of Rss here "
                     f"({biggest} shards).")
    report.table(f"Sizing {args.target_vectors:,} vectors x {args.dim} float32 from these figures",
                 ["shards", "vectors per shard", "pods", "memory per shard pod GiB", "shard memory in all GiB",
                  "disk per shard GiB", "scan p50 per shard ms", "query p50 end to end ms"], rows, note=" ".join(notes))


if __name__ == "__main__":
    main()
