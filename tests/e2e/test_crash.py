"""Crash safety: SIGKILL a writer at random moments, reopen, and check that nothing committed was lost
or half-written; then the same end to end: kill `clipseek serve` mid-index, restart, re-run `clipseek index`.

The figures of a run (faults injected, survived, documents lost) are printed with -s and kept in
``CRASH_FIGURES`` for whoever runs the module.
"""

import glob
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from executors.store.vector_store import VectorStore

from tests.conftest import draw_picture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 48
BATCH = 32
KILLS = 12
CRASH_FIGURES = {}

# The writer: appends batches of ids doc0000000, doc0000001, ... whose vectors are a function of the id,
# and re-upserts a few committed ids each time (the same vectors, re-pointed to new rows).
WRITER = r"""
import sys
import numpy as np
from executors.store.vector_store import Record, VectorStore

path, dim, batch, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = VectorStore(path, growth_rows=96)
rng = np.random.default_rng(seed)
n = store.count
print("ready", n, flush=True)
while True:
    fresh = list(range(n, n + batch))
    old = rng.choice(n, size=min(5, n), replace=False).tolist() if n else []
    numbers = fresh + old
    vectors = np.stack([np.random.default_rng(k).standard_normal(dim) for k in numbers]).astype(np.float32)
    store.upsert(vectors, [Record(id=f"doc{k:07d}", uri=f"mem://{k}", tags={"k": k}) for k in numbers], model="crash")
    n += batch
    print("committed", n, flush=True)
"""


_EXPECTED = {}


def expected_vector(k: int) -> np.ndarray:
    if k not in _EXPECTED:
        v = np.random.default_rng(k).standard_normal(DIM).astype(np.float32)
        _EXPECTED[k] = v / np.linalg.norm(v)
    return _EXPECTED[k]


def check_store(path: str, reported: int, previous: int, everything: bool = False) -> int:
    """Reopen after a kill and check it: every vector against what the writer generates for its id; search
    for every id committed since the ``previous`` check and a sample of the older ones (all if ``everything``).
    Returns the committed count."""
    store = VectorStore(path)
    try:
        count = store.count
        # everything the writer saw committed is there; at most the batch in flight went in besides
        assert reported <= count <= reported + BATCH, (reported, count)
        assert count % BATCH == 0, "a batch was committed in part"
        ids = [record.id for _, record in store.iter_records()]
        assert len(ids) == len(set(ids)) == count, "duplicate ids"
        assert sorted(ids) == [f"doc{k:07d}" for k in range(count)]
        db = sqlite3.connect(os.path.join(path, "meta.sqlite"))
        rows, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM rows").fetchone()
        db.close()
        assert rows == distinct == count
        if not count:
            return 0
        stored = store.vectors(ids)
        assert len(stored) == count
        want = np.stack([expected_vector(int(i[3:])) for i in ids])
        got = np.stack([stored[i] for i in ids])
        bad = np.flatnonzero(np.abs(got - want).max(axis=1) > 1e-6)
        assert not len(bad), f"half-written or wrong vectors for {[ids[b] for b in bad[:5]]}"
        rng = np.random.default_rng(count)
        picks = np.arange(count) if everything else np.union1d(
            np.arange(previous, count), rng.choice(count, size=min(count, 300), replace=False))
        for start in range(0, len(picks), 1024):
            part = picks[start : start + 1024]
            for p, hits in zip(part, store.search(got[part], limit=1)):
                assert hits and hits[0][0].id == ids[p] and hits[0][1] == pytest.approx(1.0, abs=1e-5), (ids[p], hits)
        return count
    finally:
        store.close()


def test_sigkill_writer_at_random_moments(tmp_path):
    path = str(tmp_path / "store")
    rng = random.Random(1234)
    injected = survived = lost = 0
    committed = 0
    for round_ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", WRITER, path, str(DIM), str(BATCH), str(round_)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = child.stdout.readline().split()
            assert first[:1] == ["ready"], child.stderr.read()
            assert int(first[1]) == committed  # it picks up exactly where the last one stopped
            time.sleep(rng.uniform(0.01, 0.3))
            child.send_signal(signal.SIGKILL)
            injected += 1
            out, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err
        # only whole lines: the kill can land while a line is half written to the pipe
        whole = out.split("\n")[:-1]
        reported = max([int(line.split()[1]) for line in whole if line.startswith("committed ")] + [committed])
        count = check_store(path, reported, committed, everything=round_ == KILLS - 1)
        lost += max(0, reported - count)
        survived += 1
        assert count >= committed
        committed = count
    CRASH_FIGURES.update(store_faults_injected=injected, store_survived=survived, store_documents_lost=lost,
                         store_rows_committed=committed)
    print(f"\nvector store: {injected} SIGKILLs injected, {survived} survived, {lost} documents lost, "
          f"{committed} rows committed")
    assert injected >= 10 and survived == injected and lost == 0
    assert committed > BATCH  # the writers did get work done between kills


def _index_count(workspace) -> int:
    found = glob.glob(os.path.join(str(workspace), "**", "meta.sqlite"), recursive=True)
    if not found:
        return 0
    try:
        db = sqlite3.connect(f"file:{found[0]}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def test_clipseek_index_resumes_after_the_server_is_killed(tiny_model, tmp_path):
    from .test_cli import CLI, Server, _env, _run
    from flows.serving import free_port

    pics = tmp_path / "pics"
    pics.mkdir()
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square")
    n = 80
    for i in range(n):
        draw_picture(pics / f"p{i:03d}.png", colours[i % 4], size=(40 + i % 17, 36 + i % 11), shape=shapes[i % 2])
    workspace = tmp_path / "ws"
    env = _env(tiny_model, workspace, (free_port(), free_port()))

    server = Server(env)
    kill_at = random.Random(7).randint(6, 30)
    try:
        indexer = subprocess.Popen(CLI + ["index", str(pics), "--request-size", "2"], env=env, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while _index_count(workspace) < kill_at and indexer.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            seen = _index_count(workspace)
            assert indexer.poll() is None, "the index run finished before the kill: nothing was tested"
            os.killpg(server.proc.pid, signal.SIGKILL)  # the serve process and every flow process it started
            server.proc.wait(30)
            out, err = indexer.communicate(timeout=120)
        finally:
            if indexer.poll() is None:
                indexer.kill()
                indexer.wait()
        assert indexer.returncode != 0 and "Traceback" not in err, err[-2000:]
    finally:
        server.stop()

    assert seen >= kill_at
    server = Server(env)
    try:
        out = _run(["index", str(pics), "--request-size", "16"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        summary = [line for line in out.stdout.splitlines() if line.startswith("indexed ")][0]
        indexed, unchanged = int(summary.split()[1].rstrip(",")), int(summary.split()[3])
        assert indexed + unchanged == n and "failed 0" in summary, summary
        assert unchanged >= seen  # what was committed before the kill is skipped, not re-embedded
        from clipseek.client import ClipseekClient
        from flows.settings import Settings

        settings = Settings(index_port=int(env["CLIPSEEK_INDEX_PORT"]), search_port=int(env["CLIPSEEK_SEARCH_PORT"]))
        client = ClipseekClient(settings.index_address, settings.search_address, timeout=60)
        assert client.status().count == n
        hits = client.search("a red circle", limit=n + 10)
        assert sorted(h.uri for h in hits) == sorted(str(p) for p in pics.iterdir())
    finally:
        assert server.stop() == 0
    lost = n - len(hits)
    CRASH_FIGURES.update(serve_faults_injected=1, serve_survived=1, serve_documents_lost=lost,
                         serve_committed_before_kill=unchanged)
    print(f"\nclipseek serve: killed with {seen}+ of {n} indexed ({unchanged} committed), re-run indexed {indexed}, "
          f"skipped {unchanged}, lost {lost}")
    assert lost == 0
