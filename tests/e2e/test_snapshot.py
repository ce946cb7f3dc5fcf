"""Snapshots: one portable, checksummed file; restore verifies before it touches anything."""

import os
import subprocess
import sys
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
