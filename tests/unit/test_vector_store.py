"""VectorStore: exact top-k against numpy, upsert/delete/clear, persistence, crash safety, locking."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from executors.store.vector_store import (
    DB_FILE,
    LOCK_FILE,
    VECTORS_FILE,
    Record,
    StoreError,
    StoreLockedError,
    VectorStore,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIM = 64


def unit(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def records(n, start=0, **extra):
    return [Record(id=f"id{i}", uri=f"/pics/{i}.png", **extra) for i in range(start, start + n)]


def brute_force(data, ids, queries, k, mask=None):
    """[(ids best first, scores)] per query, cosine over the rows where mask holds."""
    scores = unit(queries) @ unit(data).T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    out = []
    for row in scores:
        order = np.argsort(-row, kind="stable")[:k]
        order = [i for i in order if np.isfinite(row[i])]
        out.append(([ids[i] for i in order], row[order]))
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def store(tmp_path):
    s = VectorStore(str(tmp_path / "store"), growth_rows=512, chunk_rows=700)
    yield s
    s.close()


@pytest.fixture
def filled(store, rng):
    data = rng.standard_normal((5000, DIM)).astype(np.float32)
    recs = records(5000)
    for i, r in enumerate(recs):
        r.width = 100 + i
        r.height = 50
        r.tags = {"group": "a" if i % 250 == 7 else "b", "n": i % 5}
    # several upserts so rows arrive in more than one commit and the file grows more than once
    for start in range(0, 5000, 1300):
        store.upsert(data[start : start + 1300], recs[start : start + 1300], model="m")
    return store, data, [r.id for r in recs]


def run_child(code, *args, timeout=30):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": REPO},
    )


# ---- search correctness -------------------------------------------------------------------


def test_top_k_matches_brute_force_across_chunks(filled, rng):
    store, data, ids = filled
    assert store.count == 5000 and store.dim == DIM
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    k = 25
    results = store.search(queries, limit=k)
    expected = brute_force(data, ids, queries, k)
    assert len(results) == len(queries)
    for hits, (want_ids, want_scores) in zip(results, expected):
        assert [r.id for r, _ in hits] == want_ids
        scores = np.array([s for _, s in hits])
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert np.all(np.diff(scores) <= 0), "hits must come best first"


@pytest.mark.parametrize("threads", [1, 3])
def test_chunks_scanned_side_by_side_give_the_same_top_k(filled, rng, threads):
    store, data, ids = filled
    store.chunk_rows, store.scan_threads = 700, threads  # 8 chunks, the last one short
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    for q in (queries[0], queries):  # one query (gemv) and several (gemm)
        results = store.search(q, limit=12, where={"group": "b"})
        keep = [i for i in range(len(ids)) if i % 250 != 7]
        expected = brute_force(data[keep], [ids[i] for i in keep], np.atleast_2d(q), 12)
        for hits, (want_ids, want_scores) in zip(results, expected):
            assert [r.id for r, _ in hits] == want_ids
            np.testing.assert_allclose([s for _, s in hits], want_scores, atol=1e-5)


def test_a_scan_shares_its_rows_evenly_between_the_pool_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    from executors.store.scan import MIN_SPLIT_ROWS, top_k

    rows = 2 * MIN_SPLIT_ROWS + 4000  # under one 65,536-row chunk: a single thread used to scan it all
    view = unit(rng.standard_normal((rows, DIM)))
    mask = np.ones(rows, dtype=bool)
    mask[::7] = False
    queries = rng.standard_normal((2, DIM)).astype(np.float32)
    handed = []

    class Recording(ThreadPoolExecutor):
        def map(self, fn, *iterables, **kwargs):
            starts = list(iterables[0])
            handed.append(starts)
            return super().map(fn, starts, **kwargs)

    ids = [str(i) for i in range(rows)]
    with Recording(2) as pool:
        for q in (queries[0], queries):  # one query (gemv) and several (gemm)
            scores, found = top_k(view, mask, np.atleast_2d(unit(q)), 10, None, pool=lambda: pool, threads=2)
            for row_scores, row_found, (want_ids, want_scores) in zip(scores, found, brute_force(view, ids, np.atleast_2d(q), 10, mask)):
                assert [ids[r] for r in row_found] == want_ids
                np.testing.assert_allclose(row_scores, want_scores, atol=1e-5)
    assert handed == [[(0, rows // 2), (rows // 2, rows)]] * 2  # two chunks of one size, one per thread


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("chunk_rows", [700, 65536])
def test_chunks_cover_every_row_once_and_are_even_for_the_pool(threads, chunk_rows):
    from executors.store.scan import MIN_SPLIT_ROWS, chunk_bounds

    for rows in (0, 1, 699, 700, 5000, 2 * MIN_SPLIT_ROWS - 1, 2 * MIN_SPLIT_ROWS, 100_000, 1_000_003):
        chunks = chunk_bounds(rows, chunk_rows, threads)
        assert [b for _, b in chunks[:-1]] == [a for a, _ in chunks[1:]], "each chunk starts where the last stopped"
        assert (chunks[0][0], chunks[-1][1]) == (0, rows) if rows else chunks == []
        lengths = [b - a for a, b in chunks]
        assert all(0 < n <= chunk_rows for n in lengths), (rows, lengths)
        needed = -(-rows // chunk_rows)
        if threads == 1 or needed < threads and rows < 2 * MIN_SPLIT_ROWS:
            assert len(chunks) == needed, (rows, len(chunks))  # no split for the pool's sake
        else:
            assert max(lengths) - min(lengths) <= 1, (rows, lengths)
            if needed >= threads:
                assert len(chunks) % threads == 0, (rows, len(chunks))  # no thread scans a last chunk alone
            else:  # one per thread, each with enough rows to be worth the hand-off
                assert needed < len(chunks) <= threads and min(lengths) >= MIN_SPLIT_ROWS, (rows, lengths)


def test_scans_run_numpy_blas_on_one_thread_and_restore_it(filled, rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from executors.store.scan import single_threaded_blas

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    with single_threaded_blas():
        with single_threaded_blas():  # re-entrant: the inner exit keeps the limit
            pass
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
    store, _, _ = filled
    store.chunk_rows = 1000
    store.search(rng.standard_normal(DIM).astype(np.float32), limit=3)
    assert blas_threads() == before


def test_limit_larger_than_store_returns_everything_sorted(filled, rng):
    store, data, ids = filled
    q = rng.standard_normal(DIM).astype(np.float32)
    (hits,) = store.search(q, limit=6000)
    assert len(hits) == 5000
    assert len({r.id for r, _ in hits}) == 5000
    want_ids, want_scores = brute_force(data, ids, q[None], 6000)[0]
    np.testing.assert_allclose([s for _, s in hits], want_scores, atol=1e-5)


def test_search_rejects_bad_limit_and_dim(filled):
    store, _, _ = filled
    with pytest.raises(StoreError, match="limit"):
        store.search(np.ones(DIM), limit=0)
    with pytest.raises(StoreError, match="32 dimensions"):
        store.search(np.ones(32), limit=3)


def test_empty_store_search_returns_empty_lists(store):
    assert store.search(np.ones((2, 8)), limit=5) == [[], []]


def test_vectors_are_normalized_and_scores_are_cosine(store, rng):
    data = rng.standard_normal((50, 16)).astype(np.float32) * rng.uniform(0.1, 50, (50, 1)).astype(np.float32)
    store.upsert(data, records(50))
    stored = store.vectors(["id3", "id17"])
    np.testing.assert_allclose(np.linalg.norm(stored["id3"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(stored["id17"], unit(data[17]), atol=1e-6)
    # a query 37x longer than a stored vector still scores 1.0 against it (cosine, not dot product)
    (hits,) = store.search(data[3] * 37.0, limit=3)
    assert hits[0][0].id == "id3"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    expected = float(unit(data[3]) @ unit(data[int(hits[1][0].id[2:])]))
    assert hits[1][1] == pytest.approx(expected, abs=1e-5)


def test_min_score_drops_weak_hits(filled, rng):
    store, data, ids = filled
    q = rng.standard_normal(DIM).astype(np.float32)
    cos = unit(data) @ unit(q)
    floor = float(np.sort(cos)[-8])  # exactly 8 rows reach it
    (hits,) = store.search(q, limit=50, min_score=floor - 1e-7)
    assert len(hits) == 8
    assert all(s >= floor - 1e-5 for _, s in hits)
    (none,) = store.search(q, limit=50, min_score=1.01)
    assert none == []


# ---- filters applied before top-k ------------------------------------------------------


def test_where_is_applied_before_top_k(filled, rng):
    store, data, ids = filled
    group_a = np.array([i % 250 == 7 for i in range(5000)])
    assert group_a.sum() == 20
    # the query is a group "b" vector, so the globally best rows are all outside the filter
    q = data[[0, 1, 2]]
    for hits, (want_ids, want_scores) in zip(
        store.search(q, limit=10, where={"group": "a"}), brute_force(data, ids, q, 10, mask=group_a)
    ):
        assert len(hits) == 10
        assert all(r.tags["group"] == "a" for r, _ in hits)
        assert [r.id for r, _ in hits] == want_ids
        np.testing.assert_allclose([s for _, s in hits], want_scores, atol=1e-5)
    # unfiltered, the best hit is the query row itself, which is not in group a
    assert store.search(data[0], limit=1)[0][0][0].id == "id0"


def test_where_in_and_numeric_range(filled, rng):
    store, data, ids = filled
    q = rng.standard_normal((2, DIM)).astype(np.float32)
    width = np.arange(5000) + 100
    n = np.arange(5000) % 5
    where = {"tags.n": {"$in": [1, 3]}, "width": {"$gte": 1000, "$lt": 1400}}
    mask = np.isin(n, [1, 3]) & (width >= 1000) & (width < 1400)
    assert mask.sum() == 160
    for hits, (want_ids, _) in zip(store.search(q, limit=10, where=where), brute_force(data, ids, q, 10, mask=mask)):
        assert len(hits) == 10
        assert [r.id for r, _ in hits] == want_ids
        assert all(1000 <= r.width < 1400 and r.tags["n"] in (1, 3) for r, _ in hits)
    # fewer matching rows than the limit: all of them, and nothing else
    (few,) = store.search(q[0], limit=10, where={"width": {"$lte": 104}})
    assert sorted(r.id for r, _ in few) == ["id0", "id1", "id2", "id3", "id4"]
    (nothing,) = store.search(q[0], limit=10, where={"group": "zzz"})
    assert nothing == []


# ---- upsert / delete / clear -----------------------------------------------------------


def test_upsert_existing_id_replaces_it(store, rng):
    data = rng.standard_normal((200, DIM)).astype(np.float32)
    store.upsert(data, records(200))
    old = data[42].copy()
    new = -old + 0.1 * rng.standard_normal(DIM).astype(np.float32)
    store.upsert(new[None], [Record(id="id42", uri="/pics/new.png", tags={"v": 2})])
    assert store.count == 200
    assert store.get(["id42"])["id42"].uri == "/pics/new.png"
    assert store.get(["id42"])["id42"].tags == {"v": 2}
    np.testing.assert_allclose(store.vectors(["id42"])["id42"], unit(new), atol=1e-6)
    (hits,) = store.search(new, limit=1)
    assert hits[0][0].id == "id42" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    # the old vector is gone: searching for it never returns a perfect match, and id42 appears at most once
    (all_hits,) = store.search(old, limit=1000)
    assert len(all_hits) == 200
    assert [r.id for r, _ in all_hits].count("id42") == 1
    assert all_hits[0][1] < 0.99
    score42 = dict((r.id, s) for r, s in all_hits)["id42"]
    assert score42 == pytest.approx(float(unit(old) @ unit(new)), abs=1e-5)


def test_upsert_rejects_duplicate_ids_and_shape_mismatch(store):
    with pytest.raises(StoreError, match="unique"):
        store.upsert(np.ones((2, 4)), [Record("x"), Record("x")])
    with pytest.raises(StoreError, match="2-d"):
        store.upsert(np.ones((3, 4)), [Record("x"), Record("y")])
    assert store.count == 0


def test_delete(filled, rng):
    store, data, ids = filled
    gone = [f"id{i}" for i in range(0, 5000, 3)]
    assert store.delete(gone) == len(gone)
    assert store.count == 5000 - len(gone)
    assert store.get(gone) == {}
    assert store.vectors(gone[:10]) == {}
    (hits,) = store.search(data[0], limit=6000)
    assert len(hits) == store.count
    assert not {r.id for r, _ in hits} & set(gone)
    # the deleted rows' own vectors do not find them either
    for q_hits in store.search(data[[0, 3, 6]], limit=5):
        assert not {r.id for r, _ in q_hits} & set(gone)
    assert store.delete(["nope", "also-nope"]) == 0
    assert store.delete(gone[:5]) == 0
    assert store.delete([]) == 0
    assert store.count == 5000 - len(gone)


def test_clear_resets_dim_and_model(store, rng):
    store.upsert(rng.standard_normal((30, DIM)), records(30), model="clip-a")
    assert (store.dim, store.model) == (DIM, "clip-a")
    vectors_file = os.path.join(store.path, VECTORS_FILE)
    assert os.path.getsize(vectors_file) >= 30 * DIM * 4
    assert store.clear() == 30
    assert store.count == 0 and store.dim is None and store.model is None
    assert os.path.getsize(vectors_file) == 0  # the space is given back
    assert store.search(np.ones(DIM), limit=3) == [[]]
    small = rng.standard_normal((5, 8)).astype(np.float32)
    store.upsert(small, records(5), model="clip-b")
    assert (store.dim, store.model, store.count) == (8, "clip-b", 5)
    (hits,) = store.search(small[2], limit=1)
    assert hits[0][0].id == "id2" and hits[0][1] == pytest.approx(1.0, abs=1e-5)


def test_refuses_other_dim_and_model(store, rng):
    store.upsert(rng.standard_normal((3, DIM)), records(3), model="clip-a")
    with pytest.raises(StoreError) as e:
        store.upsert(rng.standard_normal((1, 32)), records(1, start=10), model="clip-a")
    assert "64-d" in str(e.value) and "32-d" in str(e.value)
    with pytest.raises(StoreError) as e:
        store.upsert(rng.standard_normal((1, DIM)), records(1, start=10), model="clip-b")
    assert "clip-a" in str(e.value) and "clip-b" in str(e.value)
    with pytest.raises(StoreError, match="NaN"):
        store.upsert(np.full((1, DIM), np.nan), records(1, start=10))
    with pytest.raises(StoreError, match="infinity"):
        store.upsert(np.full((1, DIM), np.inf), records(1, start=10))
    with pytest.raises(StoreError, match="zero"):
        store.upsert(np.zeros((2, DIM)), records(2, start=10))
    assert store.count == 3 and store.get(["id10"]) == {}


# ---- persistence and crash safety ------------------------------------------------------


def test_persistence_across_reopen(tmp_path, rng):
    path = str(tmp_path / "store")
    data = rng.standard_normal((1500, DIM)).astype(np.float32)
    s = VectorStore(path, chunk_rows=700)
    s.upsert(data, records(1500, tags={"k": "v"}), model="m")
    s.delete(["id5"])
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    before = [[(r.id, round(sc, 6)) for r, sc in hits] for hits in s.search(queries, limit=20)]
    s.close()
    s2 = VectorStore(path, chunk_rows=700)
    try:
        assert s2.count == 1499 and s2.dim == DIM and s2.model == "m"
        after = [[(r.id, round(sc, 6)) for r, sc in hits] for hits in s2.search(queries, limit=20)]
        assert after == before
        assert s2.get(["id7"])["id7"].tags == {"k": "v"}
    finally:
        s2.close()


def test_schema_version_mismatch(tmp_path, rng):
    path = str(tmp_path / "store")
    s = VectorStore(path)
    s.upsert(rng.standard_normal((2, 8)), records(2))
    s.close()
    db = sqlite3.connect(os.path.join(path, DB_FILE))
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="999"):
        VectorStore(path)


def test_garbage_past_high_water_is_ignored_and_overwritten(tmp_path, rng):
    path = str(tmp_path / "store")
    data = rng.standard_normal((100, DIM)).astype(np.float32)
    s = VectorStore(path, growth_rows=64)
    s.upsert(data, records(100))
    q = rng.standard_normal((3, DIM)).astype(np.float32)
    before = [[(r.id, round(sc, 6)) for r, sc in hits] for hits in s.search(q, limit=10)]
    s.close()
    # a kill after the vector write but before the SQLite commit: rows past the mark hold data
    # that would score far above any real row (huge, unnormalized copies of the query)
    garbage = np.tile(q[0] * 1000.0, (50, 1)).astype(np.float32)
    with open(os.path.join(path, VECTORS_FILE), "r+b") as f:
        f.seek(100 * DIM * 4)
        f.write(garbage.tobytes() + b"\x01\x02\x03")
    s = VectorStore(path, growth_rows=64)
    try:
        assert s.count == 100
        after = [[(r.id, round(sc, 6)) for r, sc in hits] for hits in s.search(q, limit=10)]
        assert after == before
        assert all(sc <= 1.0 + 1e-5 for hits in s.search(q, limit=200) for _, sc in hits)
        new = rng.standard_normal((2, DIM)).astype(np.float32)
        s.upsert(new, [Record("fresh0"), Record("fresh1")])
        assert s.count == 102
        np.testing.assert_allclose(s.vectors(["fresh0"])["fresh0"], unit(new[0]), atol=1e-6)
        (hits,) = s.search(new[1], limit=2)
        assert hits[0][0].id == "fresh1" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        (hits,) = s.search(q[0], limit=1)
        assert hits[0][1] < 0.99  # the garbage copy of q[0] was never committed
    finally:
        s.close()


def test_truncated_vectors_file_is_reported_damaged(tmp_path, rng):
    path = str(tmp_path / "store")
    s = VectorStore(path)
    s.upsert(rng.standard_normal((10, DIM)), records(10))
    s.close()
    with open(os.path.join(path, VECTORS_FILE), "r+b") as f:
        f.truncate(9 * DIM * 4 + 7)
    with pytest.raises(StoreError, match="damaged"):
        VectorStore(path)


def test_files_are_private(store, rng):
    store.upsert(rng.standard_normal((5, 8)), records(5))
    store.search(np.ones(8), limit=1)
    assert os.stat(store.path).st_mode & 0o777 == 0o700
    names = set(os.listdir(store.path))
    assert {VECTORS_FILE, DB_FILE, LOCK_FILE} <= names
    for name in names:
        mode = os.stat(os.path.join(store.path, name)).st_mode & 0o777
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    store.clear()
    assert os.stat(os.path.join(store.path, VECTORS_FILE)).st_mode & 0o777 == 0o600


# ---- accessors ----------------------------------------------------------------------------


def test_get_vectors_iter_records_status(store, rng):
    data = rng.standard_normal((7, 8)).astype(np.float32)
    recs = [
        Record(id=f"r{i}", uri=f"file:///p/{i}.jpg", tags={"label": f"L{i}", "i": i}, content_hash=f"h{i}",
               mtime=1.7e9 + i, size=1000 + i, width=640 + i, height=480)
        for i in range(7)
    ]
    store.upsert(data, recs, model="tiny")
    got = store.get(["r2", "r5", "missing"])
    assert set(got) == {"r2", "r5"}
    r2 = got["r2"]
    assert (r2.uri, r2.tags, r2.content_hash, r2.mtime, r2.size, r2.width, r2.height) == (
        "file:///p/2.jpg", {"label": "L2", "i": 2}, "h2", 1.7e9 + 2, 1002, 642, 480)
    assert r2.indexed_at is not None and r2.indexed_at > 1.6e9
    vecs = store.vectors(["r0", "r6", "missing"])
    assert set(vecs) == {"r0", "r6"}
    np.testing.assert_allclose(vecs["r6"], unit(data[6]), atol=1e-6)
    store.delete(["r3"])
    listed = list(store.iter_records(batch=2))
    assert [rec.id for _, rec in listed] == ["r0", "r1", "r2", "r4", "r5", "r6"]
    assert [row for row, _ in listed] == sorted(row for row, _ in listed)
    assert listed[3][1].tags == {"label": "L4", "i": 4}
    st = store.status()
    assert st["count"] == 6 and st["dim"] == 8 and st["model"] == "tiny"
    assert st["schema_version"] == 1 and st["path"] == store.path
    assert st["bytes_on_disk"] > 0
    json.dumps(st)


# ---- several processes ------------------------------------------------------------------

WRITER_CHILD = """
import sys, numpy as np
from executors.store.vector_store import VectorStore, Record, StoreLockedError
s = VectorStore(sys.argv[1])
try:
    s.upsert(np.ones((1, 8), dtype=np.float32), [Record("child")])
except StoreLockedError as e:
    print("LOCKED", e)
else:
    print("WROTE", s.count)
s.close()
"""


def test_writer_lock_across_processes(tmp_path, rng):
    path = str(tmp_path / "store")
    parent = VectorStore(path)
    parent.upsert(rng.standard_normal((4, 8)), records(4))
    try:
        out = run_child(WRITER_CHILD, path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("LOCKED"), out.stdout + out.stderr
        assert f"pid {os.getpid()}" in out.stdout
        assert parent.count == 4  # the refused child wrote nothing
    finally:
        parent.close()
    out = run_child(WRITER_CHILD, path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["WROTE", "5"]
    again = VectorStore(path)
    try:
        assert again.count == 5 and "child" in again.get(["child"])
    finally:
        again.close()


def test_second_writer_in_same_process_is_locked_out(tmp_path):
    path = str(tmp_path / "store")
    a, b = VectorStore(path), VectorStore(path)
    try:
        a.upsert(np.ones((1, 4)), [Record("a")])
        with pytest.raises(StoreLockedError):
            b.upsert(np.ones((1, 4)), [Record("b")])
        with pytest.raises(StoreLockedError):
            b.delete(["a"])
        assert b.search(np.ones(4), limit=5)[0][0][0].id == "a"  # reading needs no lock
    finally:
        a.close()
        b.close()


READER_CHILD = """
import json, sys, numpy as np
from executors.store.vector_store import VectorStore
s = VectorStore(sys.argv[1])
def report():
    probe = np.zeros(8, dtype=np.float32); probe[7] = 1.0
    hits = s.search(probe, limit=3)[0]
    print(json.dumps({"count": s.count, "top": [[r.id, round(sc, 5)] for r, sc in hits]}), flush=True)
report()
for line in sys.stdin:
    if line.strip() == "quit":
        break
    report()
s.close()
"""


def test_reader_in_other_process_sees_later_commits(tmp_path, rng):
    path = str(tmp_path / "store")
    writer = VectorStore(path, growth_rows=16)
    base = rng.standard_normal((20, 8)).astype(np.float32)
    base[:, 7] = 0.0  # nothing close to the probe e7 yet
    writer.upsert(base, records(20))
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(READER_CHILD), path], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO},
    )
    try:
        def ask():
            child.stdin.write("again\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())

        first = json.loads(child.stdout.readline())
        assert first["count"] == 20
        assert all(abs(sc) < 1e-5 for _, sc in first["top"])
        # commit after the reader opened (and mapped the file): 40 rows, so the file grows too
        new = rng.standard_normal((40, 8)).astype(np.float32)
        new[0] = 0.0
        new[0, 7] = 5.0
        writer.upsert(new, [Record(f"new{i}") for i in range(40)])
        second = ask()
        assert second["count"] == 60
        assert second["top"][0] == ["new0", 1.0]
        writer.delete(["new0"])
        third = ask()
        assert third["count"] == 59
        assert "new0" not in [i for i, _ in third["top"]]
        child.stdin.write("quit\n")
        child.stdin.flush()
        assert child.wait(timeout=20) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        writer.close()


# ---- float16 storage ---------------------------------------------------------------------

from executors.store.vector_store import VECTORS_FILE_F16  # noqa: E402


@pytest.fixture
def filled_f16(tmp_path, rng):
    s = VectorStore(str(tmp_path / "store16"), growth_rows=512, chunk_rows=700, dtype="float16")
    s.f16_chunk_rows = 700  # several chunks, so the widening buffer is reused
    data = rng.standard_normal((5000, DIM)).astype(np.float32)
    for start in range(0, 5000, 1300):
        s.upsert(data[start : start + 1300], records(min(1300, 5000 - start), start=start), model="m")
    yield s, data, [f"id{i}" for i in range(5000)]
    s.close()


def test_float16_store_keeps_half_the_bytes_and_records_its_dtype(filled_f16):
    store, data, _ = filled_f16
    assert store.dtype == "float16" and store.count == 5000 and store.dim == DIM
    path16 = os.path.join(store.path, VECTORS_FILE_F16)
    assert os.path.getsize(path16) >= 5000 * DIM * 2
    assert os.path.getsize(path16) < 5000 * DIM * 4
    assert not os.path.exists(os.path.join(store.path, VECTORS_FILE))
    assert os.stat(path16).st_mode & 0o777 == 0o600
    stored = store.vectors(["id3", "id4999"])
    assert stored["id3"].dtype == np.float32
    np.testing.assert_allclose(stored["id3"], unit(data[3]), atol=1e-3)
    np.testing.assert_allclose(stored["id4999"], unit(data[4999]), atol=1e-3)


@pytest.mark.parametrize("scan", ["torch", "numpy"])
def test_float16_top_k_close_to_float32_brute_force(filled_f16, rng, scan):
    store, data, ids = filled_f16
    store.scan = scan
    queries = rng.standard_normal((6, DIM)).astype(np.float32)
    k = 25
    results = store.search(queries, limit=k)
    found = 0
    for hits, (want_ids, want_scores) in zip(results, brute_force(data, ids, queries, k)):
        assert len(hits) == k
        scores = np.array([s for _, s in hits])
        assert np.all(np.diff(scores) <= 0), "hits must come best first"
        np.testing.assert_allclose(scores, want_scores, atol=2e-3)
        found += len({r.id for r, _ in hits} & set(want_ids))
    assert found / (k * len(queries)) >= 0.95
    # a stored vector still finds itself first, with a cosine of 1 within float16 precision
    (hits,) = store.search(data[1234], limit=1)
    assert hits[0][0].id == "id1234" and hits[0][1] == pytest.approx(1.0, abs=2e-3)


def test_scans_agree_for_both_dtypes(filled, filled_f16, rng):
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    for store, atol in ((filled[0], 1e-5), (filled_f16[0], 5e-4)):  # torch gives float16 rows float16 scores
        answers = {}
        for scan in ("auto", "torch", "numpy"):
            store.scan = scan
            answers[scan] = store.search(queries, limit=15)
            answers[scan + "-one"] = store.search(queries[0], limit=15)
        want = answers["numpy"]
        for key in ("auto", "torch", "auto-one", "torch-one", "numpy-one"):
            got = answers[key]
            for hits, want_hits in zip(got, want):
                want_scores = {r.id: s for r, s in want_hits}
                if store is filled[0]:
                    assert [r.id for r, _ in hits] == list(want_scores), key
                else:  # rounded scores may swap near-ties
                    assert len({r.id for r, _ in hits} & set(want_scores)) >= 13, key
                for r, score in hits:
                    if r.id in want_scores:
                        assert score == pytest.approx(want_scores[r.id], abs=atol), key


def test_float16_dtype_is_read_back_by_later_openers(tmp_path, rng):
    path = str(tmp_path / "store")
    data = rng.standard_normal((300, DIM)).astype(np.float32)
    s = VectorStore(path, dtype="fp16")
    s.upsert(data, records(300), model="m")
    s.close()
    reader = VectorStore(path)  # no dtype asked: the recorded one is used
    try:
        assert reader.dtype == "float16"
        (hits,) = reader.search(data[42], limit=1)
        assert hits[0][0].id == "id42" and hits[0][1] == pytest.approx(1.0, abs=2e-3)
        with pytest.raises(StoreError, match="float16"):
            VectorStore(path, dtype="float32")  # holds vectors: cannot change
        assert VectorStore(path, dtype=np.float16).dtype == "float16"  # asking for what it is works
    finally:
        reader.close()
    with pytest.raises(StoreError, match="not one of"):
        VectorStore(str(tmp_path / "other"), dtype="int8")


def test_float32_is_the_default_and_an_empty_store_takes_a_new_dtype(tmp_path, rng):
    path = str(tmp_path / "store")
    s = VectorStore(path)
    s.upsert(rng.standard_normal((10, 8)), records(10))
    assert s.dtype == "float32"
    s.close()
    with pytest.raises(StoreError, match="float32"):
        VectorStore(path, dtype="float16")
    s = VectorStore(path)
    s.clear()
    s.close()
    s = VectorStore(path, dtype="float16")  # empty after clear: it may change
    try:
        assert s.dtype == "float16"
        new = rng.standard_normal((5, 8)).astype(np.float32)
        s.upsert(new, records(5))
        (hits,) = s.search(new[3], limit=1)
        assert hits[0][0].id == "id3"
        assert os.path.getsize(os.path.join(path, VECTORS_FILE_F16)) >= 5 * 8 * 2
    finally:
        s.close()


def test_float16_garbage_past_high_water_is_ignored_and_truncation_reported(tmp_path, rng):
    path = str(tmp_path / "store")
    data = rng.standard_normal((100, DIM)).astype(np.float32)
    s = VectorStore(path, growth_rows=64, dtype="float16")
    s.upsert(data, records(100))
    q = rng.standard_normal((2, DIM)).astype(np.float32)
    before = [[(r.id, round(sc, 4)) for r, sc in hits] for hits in s.search(q, limit=10)]
    s.close()
    with open(os.path.join(path, VECTORS_FILE_F16), "r+b") as f:  # an uncommitted write: huge copies of q[0]
        f.seek(100 * DIM * 2)
        f.write(np.tile(q[0] * 100.0, (20, 1)).astype(np.float16).tobytes())
    s = VectorStore(path, growth_rows=64)
    try:
        assert [[(r.id, round(sc, 4)) for r, sc in hits] for hits in s.search(q, limit=10)] == before
        s.upsert(q[:1], [Record("fresh")])
        (hits,) = s.search(q[0], limit=1)
        assert hits[0][0].id == "fresh" and hits[0][1] == pytest.approx(1.0, abs=2e-3)
    finally:
        s.close()
    with open(os.path.join(path, VECTORS_FILE_F16), "r+b") as f:
        f.truncate(50 * DIM * 2)
    with pytest.raises(StoreError, match="damaged"):
        VectorStore(path)


def test_a_uri_stored_under_another_id_is_replaced_not_added(store, rng):
    """One entry per picture: a document posted with a random id and then with clipseek's id is one entry."""
    first, second = rng.standard_normal((2, DIM)).astype(np.float32)
    store.upsert(first[None], [Record(id="random-id", uri="/photos/cat.jpg")])
    store.upsert(second[None], [Record(id="path-id", uri="/photos/cat.jpg")])
    assert store.count == 1 and list(store.get(["random-id", "path-id"])) == ["path-id"]
    hits = store.search(second, limit=5)[0]
    assert [(r.id, r.uri) for r, _ in hits] == [("path-id", "/photos/cat.jpg")]
    with pytest.raises(StoreError, match="uris must be unique within one upsert"):
        store.upsert(np.stack([first, second]), [Record(id="a", uri="/x.png"), Record(id="b", uri="/x.png")])


def test_a_reader_holding_the_rows_of_before_a_clear_never_pairs_them_with_new_pictures(tmp_path, rng):
    """clear() starts row numbers again at 0: a search whose scan ran on the old rows must not name the new
    picture that took an old row's number (it searches again on the new rows)."""
    writer = VectorStore(str(tmp_path / "s"))
    reader = VectorStore(str(tmp_path / "s"), read_only=True)
    old, new = rng.standard_normal((2, 3, DIM)).astype(np.float32)
    writer.upsert(old, [Record(id=f"old{i}", uri=f"/old{i}.png") for i in range(3)])
    assert reader.search(old[0], limit=1)[0][0][0].id == "old0"
    stale = reader._refresh()
    writer.clear()
    writer.upsert(new, [Record(id=f"new{i}", uri=f"/new{i}.png") for i in range(3)])
    real_refresh, calls = reader._refresh, []

    def refresh_as_of_before_the_clear():  # the clear lands between the reader's scan and its record read
        calls.append(1)
        return stale if len(calls) == 1 else real_refresh()

    reader._refresh = refresh_as_of_before_the_clear
    hits = reader.search(old[0], limit=3)[0]
    assert {r.id for r, _ in hits} == {"new0", "new1", "new2"}  # the new rows, each with its own score
    for record, score in hits:
        want = float(new[int(record.id[-1])] @ old[0] / np.linalg.norm(new[int(record.id[-1])]) / np.linalg.norm(old[0]))
        assert score == pytest.approx(want, abs=1e-5)
    reader.close()
    writer.close()
