"""Snapshots: one portable, checksummed file; restore verifies before it touches anything."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from executors.store import snapshot
from executors.store.vector_store import Record, VectorStore


def _fill(folder, n=300, dim=16, model="m1", seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    store = VectorStore(str(folder))
    store.upsert(vectors, [Record(id=f"id{i}", uri=f"/p/{i}.jpg", tags={"k": i % 3}, size=i) for i in range(n)], model=model)
    store.delete(["id0", "id1"])  # deleted rows must not travel
    return store, vectors


def _top(store, vectors, k=5):
    return [[r.id for r, _ in hits] for hits in store.search(vectors[:10], limit=k)]


def test_create_verify_restore_round_trip(tmp_path):
    store, vectors = _fill(tmp_path / "a")
    expected = _top(store, vectors)
    manifest = snapshot.create(store, str(tmp_path / "snap.zip"))
    store.close()
    assert manifest["count"] == 298 and manifest["dim"] == 16 and manifest["model"] == "m1"
    assert snapshot.verify(str(tmp_path / "snap.zip"))["sha256"] == manifest["sha256"]
    snapshot.restore(str(tmp_path / "snap.zip"), str(tmp_path / "b"))
    restored = VectorStore(str(tmp_path / "b"))
    assert restored.count == 298 and restored.model == "m1" and restored.dim == 16
    assert _top(restored, vectors) == expected
    assert restored.get(["id5"])["id5"].tags == {"k": 2} and not restored.get(["id0"])
    assert not os.path.exists(str(tmp_path / "b") + ".restoring")


def test_float16_index_is_restored_as_float16(tmp_path):
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    store = VectorStore(str(tmp_path / "half"), dtype="float16")
    store.upsert(vectors, [Record(id=f"id{i}", uri=f"/p/{i}.jpg") for i in range(200)], model="m1")
    expected = _top(store, vectors)
    manifest = snapshot.create(store, str(tmp_path / "snap.zip"))
    store.close()
    assert manifest["storage_dtype"] == "float16"
    snapshot.restore(str(tmp_path / "snap.zip"), str(tmp_path / "back"))
    restored = VectorStore(str(tmp_path / "back"))
    assert restored.dtype == "float16" and restored.count == 200 and _top(restored, vectors) == expected
    assert os.path.exists(str(tmp_path / "back" / "vectors.f16")) and not os.path.exists(str(tmp_path / "back" / "vectors.f32"))
    restored.close()


def _untouched_after(tmp_path, bad_file, match):
    store, vectors = _fill(tmp_path / "live", seed=3)
    before = _top(store, vectors)
    store.close()
    with pytest.raises(snapshot.SnapshotError, match=match):
        snapshot.restore(str(bad_file), str(tmp_path / "live"))
    again = VectorStore(str(tmp_path / "live"))
    assert again.count == 298 and _top(again, vectors) == before


def test_corrupt_snapshot_is_refused_and_index_untouched(tmp_path):
    store, _ = _fill(tmp_path / "src")
    snapshot.create(store, str(tmp_path / "good.zip"))
    data = bytearray((tmp_path / "good.zip").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.zip") as zf:
        offset = zf.getinfo("vectors.f32").header_offset + 100
    data[offset] ^= 0xFF
    (tmp_path / "corrupt.zip").write_bytes(bytes(data))
    _untouched_after(tmp_path, tmp_path / "corrupt.zip", "checksum|corrupt")


def test_truncated_snapshot_is_refused(tmp_path):
    store, _ = _fill(tmp_path / "src")
    snapshot.create(store, str(tmp_path / "good.zip"))
    data = (tmp_path / "good.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    _untouched_after(tmp_path, tmp_path / "cut.zip", "truncated or corrupt")


def test_snapshot_of_another_model_is_refused(tmp_path):
    other, _ = _fill(tmp_path / "other", dim=8, model="m2")
    snapshot.create(other, str(tmp_path / "other.zip"))
    _untouched_after(tmp_path, tmp_path / "other.zip", "m2")


def test_restore_refused_while_a_writer_holds_the_index(tmp_path):
    store, _ = _fill(tmp_path / "src")
    snapshot.create(store, str(tmp_path / "s.zip"))
    writer, _ = _fill(tmp_path / "busy", seed=1)  # holds the write lock, as a running index flow does
    code = ("import sys; from executors.store import snapshot\n"
            "try:\n    snapshot.restore(sys.argv[1], sys.argv[2])\n"
            "except snapshot.StoreError as e:\n    print('refused', e); sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.zip"), str(tmp_path / "busy")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 3 and "open for writing by another process" in out.stdout
    assert writer.count == 298


def test_cli_snapshot_create_and_restore(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workspace = tmp_path / "ws"
    store, vectors = _fill(workspace / "SimpleIndexer" / "0")
    store.close()
    env = {**os.environ, "CLIPSEEK_WORKSPACE": str(workspace)}
    made = subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "create", str(tmp_path / "s.zip")],
                          capture_output=True, text=True, env=env, cwd=root)
    assert made.returncode == 0, made.stderr
    assert "298 documents" in made.stdout
    env2 = {**os.environ, "CLIPSEEK_WORKSPACE": str(tmp_path / "ws2")}
    back = subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "restore", str(tmp_path / "s.zip")],
                          capture_output=True, text=True, env=env2, cwd=root)
    assert back.returncode == 0, back.stderr
    assert VectorStore(str(tmp_path / "ws2" / "SimpleIndexer" / "0")).count == 298
    bad = subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "restore", str(tmp_path / "missing.zip")],
                         capture_output=True, text=True, env=env2, cwd=root)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


# ---- a failed restore never loses the index ------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _snapshot_of_200(tmp_path, name="s200.zip"):
    """A sound snapshot of 200 documents (16-d, model m1) and the top hits it should answer."""
    store, vectors = _fill(tmp_path / "src200", n=202, seed=7)  # 202 - 2 deleted
    expected = _top(store, vectors)
    snapshot.create(store, str(tmp_path / name))
    store.close()
    return tmp_path / name, vectors, expected


def _rebuild(src, dst, *, records=None, manifest=None, rehash=True):
    """Copy snapshot ``src`` to ``dst`` with records.jsonl lines / the manifest edited, checksums recomputed."""
    with zipfile.ZipFile(src) as zf:
        parts = {name: zf.read(name) for name in zf.namelist()}
    info = json.loads(parts["manifest.json"])
    if records is not None:
        lines = [json.loads(line) for line in parts["records.jsonl"].decode().splitlines()]
        parts["records.jsonl"] = "".join(json.dumps(r) + "\n" for r in records(lines)).encode()
    if rehash:
        info["sha256"] = {name: hashlib.sha256(parts[name]).hexdigest() for name in ("vectors.f32", "records.jsonl")}
    if manifest is not None:
        info = manifest(info)
    parts["manifest.json"] = json.dumps(info).encode()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, data)
    return dst


def _with_field(lines, at=150, name="embedding_note", value="from a newer clipseek"):
    lines[at][name] = value
    return lines


def _siblings(folder):
    base = os.path.basename(str(folder))
    return sorted(n for n in os.listdir(os.path.dirname(str(folder))) if n.startswith(base + "."))


def test_unknown_record_field_is_refused_and_index_untouched(tmp_path):
    good, _, _ = _snapshot_of_200(tmp_path)
    bad = _rebuild(good, tmp_path / "newer.zip", records=_with_field)
    snapshot.verify(str(bad))  # checksums hold: only the restore can see the field
    _untouched_after(tmp_path, bad, "records.jsonl.*line 151.*'embedding_note'")
    assert _siblings(tmp_path / "live") == []


def test_bad_storage_dtype_is_refused_and_index_untouched(tmp_path):
    good, _, _ = _snapshot_of_200(tmp_path)
    bad = _rebuild(good, tmp_path / "dtype.zip", manifest=lambda m: {**m, "storage_dtype": "bfloat99"})
    _untouched_after(tmp_path, bad, "storage type 'bfloat99'")
    assert _siblings(tmp_path / "live") == []


@pytest.mark.parametrize("edit", [
    lambda m: {**m, "sha256": {}},
    lambda m: {k: v for k, v in m.items() if k != "sha256"},
    lambda m: {**m, "sha256": {"vectors.f32": m["sha256"]["vectors.f32"]}},
    lambda m: {**m, "sha256": "0" * 64},
], ids=["empty", "missing", "one-part-unchecked", "not-a-map"])
def test_manifest_without_checksums_is_refused(tmp_path, edit):
    good, _, _ = _snapshot_of_200(tmp_path)
    bad = _rebuild(good, tmp_path / "unchecked.zip", manifest=edit)
    with pytest.raises(snapshot.SnapshotError, match="holds no checksum"):
        snapshot.verify(str(bad))
    _untouched_after(tmp_path, bad, "holds no checksum")


def test_indexed_at_survives_create_restore_round_trip(tmp_path):
    store, vectors = _fill(tmp_path / "a", n=50)
    store.close()
    with sqlite3.connect(str(tmp_path / "a" / "meta.sqlite")) as db:  # indexed long ago, each at its own time
        db.execute("UPDATE rows SET indexed_at = 1.5e9 + row * 60.25")
    store = VectorStore(str(tmp_path / "a"))
    before = {r.id: r.indexed_at for _, r in store.iter_records()}
    snapshot.create(store, str(tmp_path / "s.zip"))
    store.close()
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        first = json.loads(zf.read("records.jsonl").decode().splitlines()[0])
    assert first["indexed_at"] == before[first["id"]]  # the snapshot records it
    snapshot.restore(str(tmp_path / "s.zip"), str(tmp_path / "b"))
    restored = VectorStore(str(tmp_path / "b"))
    assert {r.id: r.indexed_at for _, r in restored.iter_records()} == before
    restored.close()
    # a snapshot written without the field (an older one) takes the time of the restore
    old = _rebuild(tmp_path / "s.zip", tmp_path / "old.zip",
                   records=lambda lines: [{k: v for k, v in r.items() if k != "indexed_at"} for r in lines])
    started = time.time()
    snapshot.restore(str(old), str(tmp_path / "c"))
    again = VectorStore(str(tmp_path / "c"))
    assert all(r.indexed_at >= started for _, r in again.iter_records()) and again.count == 48
    again.close()


def test_failure_while_staging_leaves_the_old_index_intact(tmp_path, monkeypatch):
    good, _, _ = _snapshot_of_200(tmp_path)
    monkeypatch.setattr(snapshot, "BATCH", 50)
    real_upsert, calls = VectorStore.upsert, []

    def upsert(self, *args, **kwargs):
        if self.path.endswith(".restoring"):  # the staged copy: the disk fills after its first batch
            calls.append(self.path)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real_upsert(self, *args, **kwargs)

    monkeypatch.setattr(VectorStore, "upsert", upsert)
    _untouched_after(tmp_path, good, "No space left on device")
    assert len(calls) == 2
    assert _siblings(tmp_path / "live") == []
    monkeypatch.setattr(VectorStore, "upsert", real_upsert)
    again = VectorStore(str(tmp_path / "live"))  # the writer lock was given back
    again.upsert(np.ones((1, 16), dtype=np.float32), [Record("after")], model="m1")
    assert again.count == 299
    again.close()


def test_restore_replaces_the_index_and_leaves_no_staging(tmp_path):
    good, vectors, expected = _snapshot_of_200(tmp_path)
    store, _ = _fill(tmp_path / "live", seed=3)
    store.close()
    snapshot.restore(str(good), str(tmp_path / "live"))
    back = VectorStore(str(tmp_path / "live"))
    assert back.count == 200 and _top(back, vectors) == expected
    back.close()
    assert _siblings(tmp_path / "live") == []


def test_restore_without_an_atomic_exchange_still_replaces_the_index(tmp_path, monkeypatch):
    good, vectors, expected = _snapshot_of_200(tmp_path)
    store, _ = _fill(tmp_path / "live", seed=3)
    store.close()
    monkeypatch.setattr(snapshot, "_exchange", lambda a, b: False)  # a filesystem without one
    snapshot.restore(str(good), str(tmp_path / "live"))
    back = VectorStore(str(tmp_path / "live"))
    assert back.count == 200 and _top(back, vectors) == expected
    back.close()
    assert _siblings(tmp_path / "live") == []


CRASH_CHILD = """
import os, shutil, sys
from executors.store import snapshot
from executors.store.vector_store import VectorStore
path, folder, step = sys.argv[1:4]
if step == "staging":  # killed after the first batch reached the staged copy
    snapshot.BATCH = 50
    real, calls = VectorStore.upsert, []
    def upsert(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os._exit(9)
        return real(self, *a, **k)
    VectorStore.upsert = upsert
elif step == "verified":  # killed once the staged copy is complete, before the swap
    def swap(staged, target):
        os._exit(9)
    snapshot._swap = swap
elif step == "swapped":  # killed right after the swap, the old index still beside the new one
    real_swap = snapshot._swap
    def swap(staged, target):
        real_swap(staged, target)
        os._exit(9)
    snapshot._swap = swap
elif step == "cleanup":  # killed while the old index is being removed
    real_unlink = os.unlink
    def unlink(p, *a, **k):
        real_unlink(p, *a, **k)
        os._exit(9)
    os.unlink = unlink
elif step == "between-renames":  # no atomic exchange: killed between the two renames
    snapshot._exchange = lambda a, b: False
    real_replace = os.replace
    def replace(a, b):
        real_replace(a, b)
        if os.path.isdir(b) and b.endswith(".replaced"):
            os._exit(9)
    os.replace = replace
snapshot.restore(path, folder)
"""


@pytest.mark.parametrize("step,survivor", [("staging", "old"), ("verified", "old"), ("swapped", "new"),
                                           ("cleanup", "new"), ("between-renames", "old")])
def test_a_kill_at_any_step_leaves_one_whole_index(tmp_path, step, survivor):
    good, new_vectors, new_top = _snapshot_of_200(tmp_path)
    store, old_vectors = _fill(tmp_path / "live", seed=3)
    old_top = _top(store, old_vectors)
    store.close()
    folder = str(tmp_path / "live")
    out = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(good), folder, step], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 9, out.stderr
    if step == "between-renames":  # the one window without an exchange: the next restore puts the old index back
        assert not os.path.exists(folder)
        with pytest.raises(snapshot.SnapshotError):
            snapshot.restore(str(tmp_path / "missing.zip"), folder)
    reopened = VectorStore(folder)  # what a restarted server opens
    if survivor == "old":
        assert reopened.count == 298 and _top(reopened, old_vectors) == old_top
    else:
        assert reopened.count == 200 and _top(reopened, new_vectors) == new_top
    reopened.close()
    snapshot.restore(str(good), folder)  # the next restore cleans what the killed one left
    back = VectorStore(folder)
    assert back.count == 200 and _top(back, new_vectors) == new_top
    back.close()
    assert _siblings(folder) == []


def test_cli_restore_is_refused_while_a_server_holds_the_workspace(tmp_path):
    """A running server refuses the restore even before it has written (its search flow takes no writer lock)."""
    from flows.serving import workspace_lock
    from flows.settings import Settings

    workspace = tmp_path / "ws"
    store, _ = _fill(workspace / "SimpleIndexer" / "0")
    store.close()
    reader = VectorStore(str(workspace / "SimpleIndexer" / "0"))
    snapshot.create(reader, str(tmp_path / "s.zip"))
    reader.close()
    env = {**os.environ, "CLIPSEEK_WORKSPACE": str(workspace)}
    with workspace_lock(Settings(workspace=str(workspace), index_port=51700, search_port=51701)):
        refused = subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "restore", str(tmp_path / "s.zip")],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr and "index port 51700" in refused.stderr
    done = subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "restore", str(tmp_path / "s.zip")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
