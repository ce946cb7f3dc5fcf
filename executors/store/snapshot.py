"""Portable snapshots of a VectorStore: one zip file with vectors, metadata, model name,
schema version and a SHA-256 of every part.

    manifest.json   {"format": 1, "schema_version", "model", "dim", "count", "storage_dtype", "sha256": {...}}
    records.jsonl   one JSON object per document (every Record field, ``indexed_at`` too), in the order of the vectors
    vectors.f32     count x dim float32, row-major

Restoring verifies the whole file first and refuses a corrupt, truncated, unchecked (no checksum
for a part) or mismatched one (another model or dimension than the index it replaces). It then
writes the new index into a sibling folder (``<index>.restoring``) while it holds the writer lock
of the current one, checks that the copy holds the count and dim the manifest promises, and only
then swaps the two folders in one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux,
``renamex_np(RENAME_SWAP)`` on macOS); the old index is removed after. A failure or a kill before
the swap leaves the current index as it was; after it the new index is whole. What a killed
restore leaves beside the index is removed by the next restore. Where the filesystem cannot
exchange two folders the swap is two renames (index to ``<index>.replaced``, copy to index); a
kill between them leaves no index folder, and the next restore puts ``<index>.replaced`` back
before anything else.
"""

import ctypes
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import zipfile
from dataclasses import asdict
from typing import Callable, Dict, Optional

import numpy as np

from executors.store.vector_store import SCHEMA_VERSION, STORAGE, Record, StoreError, VectorStore, lock_writer, sync_folder

FORMAT = 1
BATCH = 4096
PARTS = ("vectors.f32", "records.jsonl")
RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))
STAGING_SUFFIX = ".restoring"
REPLACED_SUFFIX = ".replaced"

logger = logging.getLogger(__name__)


class SnapshotError(StoreError):
    """A snapshot that cannot be written or restored; the message says why."""


def create(store: VectorStore, path: str) -> Dict:
    """Write every live document of ``store`` to the snapshot file ``path``; returns the manifest."""
    tmp = path + ".partial"
    vec_hash, rec_hash = hashlib.sha256(), hashlib.sha256()
    count, dim = 0, store.dim
    records_tmp = path + ".records"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
                open(records_tmp, "wb") as records_out:
            with zf.open("vectors.f32", "w", force_zip64=True) as vec_out:
                batch = []
                for _row, record in store.iter_records():
                    batch.append(record)
                    if len(batch) == BATCH:
                        count += _write_batch(store, batch, vec_out, vec_hash, records_out, rec_hash)
                        batch = []
                if batch:
                    count += _write_batch(store, batch, vec_out, vec_hash, records_out, rec_hash)
            records_out.close()
            zf.write(records_tmp, "records.jsonl")
            manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": store.model, "dim": dim,
                        "count": count, "storage_dtype": store.dtype,
                        "sha256": {"vectors.f32": vec_hash.hexdigest(), "records.jsonl": rec_hash.hexdigest()}}
            zf.writestr("manifest.json", json.dumps(manifest, indent=2))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, records_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return manifest


def _write_batch(store, batch, vec_out, vec_hash, records_out, rec_hash) -> int:
    vectors = store.vectors([r.id for r in batch])
    n = 0
    for record in batch:
        vector = vectors.get(record.id)
        if vector is None:  # deleted while the snapshot was being written
            continue
        data = np.asarray(vector, dtype="<f4").tobytes()
        vec_out.write(data)
        vec_hash.update(data)
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        records_out.write(line)
        rec_hash.update(line)
        n += 1
    return n


def verify(path: str) -> Dict:
    """The manifest of a sound snapshot; SnapshotError naming what is wrong otherwise."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for needed in ("manifest.json", "records.jsonl", "vectors.f32"):
                if needed not in names:
                    raise SnapshotError(f"{path}: not a clipseek snapshot (no {needed})")
            manifest = json.loads(zf.read("manifest.json"))
            if not isinstance(manifest, dict):
                raise SnapshotError(f"{path}: manifest.json is not a JSON object")
            if manifest.get("format") != FORMAT:
                raise SnapshotError(f"{path}: snapshot format {manifest.get('format')} is not {FORMAT}")
            if manifest.get("schema_version") != SCHEMA_VERSION:
                raise SnapshotError(f"{path}: made with index schema {manifest.get('schema_version')}, "
                                    f"this clipseek reads schema {SCHEMA_VERSION}")
            _check_manifest(path, manifest)
            checksums = manifest.get("sha256")
            if not isinstance(checksums, dict) or not checksums:
                raise SnapshotError(f"{path}: the manifest holds no checksums (its sha256 map is missing or empty); "
                                    f"a snapshot that cannot be verified is refused")
            for part in PARTS:
                if not isinstance(checksums.get(part), str) or not checksums[part]:
                    raise SnapshotError(f"{path}: the manifest holds no checksum for {part}; "
                                        f"a snapshot that cannot be verified is refused")
            for name, expected in checksums.items():
                if name not in names:
                    raise SnapshotError(f"{path}: the manifest lists a checksum of {name}, which the file does not hold")
                digest = hashlib.sha256()
                with zf.open(name) as member:
                    for chunk in iter(lambda: member.read(1 << 20), b""):
                        digest.update(chunk)
                if digest.hexdigest() != expected:
                    raise SnapshotError(f"{path}: {name} fails its checksum (the file is corrupt)")
            size = zf.getinfo("vectors.f32").file_size
            if manifest["count"] and size != manifest["count"] * manifest["dim"] * 4:
                raise SnapshotError(f"{path}: vectors.f32 holds {size} bytes, the manifest promises "
                                    f"{manifest['count']} x {manifest['dim']} float32")
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError) as e:
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"{path}: not a readable snapshot (truncated or corrupt: {e})") from None
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such file") from None
    return manifest


def _check_manifest(path: str, manifest: Dict) -> None:
    count, dim, dtype, model = (manifest.get(k) for k in ("count", "dim", "storage_dtype", "model"))
    if not _is_int(count) or count < 0:
        raise SnapshotError(f"{path}: the manifest's count {count!r} is not a number of documents")
    if count and (not _is_int(dim) or dim < 1):
        raise SnapshotError(f"{path}: the manifest's dim {dim!r} is not a number of dimensions")
    if dtype is not None and dtype not in STORAGE:
        raise SnapshotError(f"{path}: the manifest names storage type {dtype!r}; this clipseek stores "
                            f"{' or '.join(STORAGE)}")
    if model is not None and not isinstance(model, str):
        raise SnapshotError(f"{path}: the manifest's model {model!r} is not a name")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def restore(path: str, folder: str, *, expect_model: Optional[str] = None) -> Dict:
    """Replace the index in ``folder`` by the snapshot ``path``, after verifying it whole.

    Refuses a snapshot of another model or dimension than the index in ``folder`` holds (clear
    it first to change model) or than ``expect_model``, and refuses while another process holds the
    writer lock of the index. Stop the servers that use the folder first. Any failure before the
    swap leaves the current index as it was; restoring needs room on disk for a second copy.
    """
    folder = os.path.realpath(folder)
    staged, replaced = folder + STAGING_SUFFIX, folder + REPLACED_SUFFIX
    _recover(folder)
    manifest = verify(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    # The writer lock of the current index, held until the swap: refused while a server writes to it,
    # and no second restore stages beside this one. No connection to the current index stays open
    # across the swap (SQLite finds its -wal and -shm files by name, which then belong to the new one).
    lock_fd = _lock_writer(folder)
    try:
        current = VectorStore(folder)
        try:
            count, dim, model, dtype = current.count, current.dim, current.model, current.dtype
        finally:
            current.close()
        if count and (dim != manifest["dim"] or (model and model != manifest["model"])):
            raise SnapshotError(
                f"{path} holds {manifest['dim']}-d embeddings of {manifest['model']!r}; the index at {folder} holds "
                f"{dim}-d embeddings of {model!r}. Clear the index first to replace it with another model's")
        if expect_model and manifest["model"] and manifest["model"] != expect_model:
            raise SnapshotError(f"{path} holds embeddings of {manifest['model']!r}, not of {expect_model!r}")
        # the rows travel as float32; they are stored again as the snapshot's index stored them
        # (snapshots written before this was recorded keep the dtype of the index they replace)
        dtype = manifest.get("storage_dtype") or dtype
        _remove(staged, "an earlier restore's leftover")
        _remove(replaced, "an earlier restore's leftover")
        try:
            _stage(path, manifest, staged, dtype)
            _swap(staged, folder)
        except SnapshotError:
            _remove(staged, "the unfinished copy")
            raise
        except (StoreError, OSError) as e:
            _remove(staged, "the unfinished copy")
            raise SnapshotError(f"{path}: restoring into {folder} failed ({e}); the index there is unchanged") from e
        except BaseException:
            _remove(staged, "the unfinished copy")
            raise
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    logger.info("restored %d documents from %s into %s", manifest["count"], path, folder)
    _remove(staged, "the replaced index")  # where an exchange left the old index
    _remove(replaced, "the replaced index")  # where two renames left it
    return manifest


def _stage(path: str, manifest: Dict, staged: str, dtype: str) -> None:
    """Write the snapshot's index into the new folder ``staged`` and check it holds what the manifest promises."""
    count, dim, model = manifest["count"], manifest.get("dim"), manifest.get("model")
    fresh = VectorStore(staged, dtype=dtype)
    written = 0
    try:
        with zipfile.ZipFile(path) as zf, zf.open("vectors.f32") as vec_in, zf.open("records.jsonl") as rec_in:
            while True:
                lines = [rec_in.readline() for _ in range(BATCH)]
                lines = [line for line in lines if line]
                if not lines:
                    break
                records = [_parse_record(path, written + i + 1, line) for i, line in enumerate(lines)]
                if written + len(records) > count:
                    raise SnapshotError(f"{path}: records.jsonl holds more records than the {count} the manifest promises")
                vectors = np.frombuffer(vec_in.read(dim * 4 * len(records)), dtype="<f4").reshape(len(records), dim)
                fresh.upsert(vectors, records, model=model, keep_indexed_at=True)
                written += len(records)
        if written != count:
            raise SnapshotError(f"{path}: records.jsonl holds {written} records, the manifest promises {count}")
    finally:
        fresh.close()
    check = VectorStore(staged)
    try:
        have = (check.count, check.dim if count else dim, check.dtype)
    finally:
        check.close()
    if have != (count, dim, dtype):
        raise SnapshotError(f"{path}: the restored copy at {staged} holds {have[0]} documents of {have[1]} dimensions "
                            f"({have[2]}); the manifest promises {count} of {dim} ({dtype})")


def _parse_record(path: str, line_no: int, line: bytes) -> Record:
    try:
        data = json.loads(line.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise SnapshotError(f"{path}: records.jsonl line {line_no} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"{path}: records.jsonl line {line_no} is not a JSON object")
    unknown = [name for name in data if name not in RECORD_FIELDS]
    if unknown:
        raise SnapshotError(
            f"{path}: records.jsonl line {line_no} has the field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(name) for name in unknown)}, which this clipseek does not know "
            f"(a snapshot of a newer version?); nothing was restored")
    if not isinstance(data.get("id"), str) or not data["id"]:
        raise SnapshotError(f"{path}: records.jsonl line {line_no} has no id")
    return Record(**data)


def _lock_writer(folder: str) -> int:
    """Hold the writer lock of the index in ``folder`` (the same lock a writing VectorStore takes)."""
    return lock_writer(folder, "stop that process before restoring into it")


def _swap(staged: str, folder: str) -> None:
    """Put the complete index ``staged`` in the place of ``folder``. The old index ends up at ``staged``
    (after an atomic exchange) or at ``folder.replaced`` (two renames, where no exchange is possible)."""
    parent = os.path.dirname(folder)
    sync_folder(staged)
    if not _exchange(staged, folder):
        logger.warning("%s: this filesystem cannot exchange two folders in one step; the index is replaced by "
                       "two renames", parent)
        replaced = folder + REPLACED_SUFFIX
        os.replace(folder, replaced)
        try:
            os.replace(staged, folder)
        except BaseException:
            os.replace(replaced, folder)
            raise
    try:
        sync_folder(parent)
    except OSError as e:
        logger.warning("cannot sync %s after the swap (%s)", parent, e)


def _exchange(a: str, b: str) -> bool:
    """Swap the folders ``a`` and ``b`` in one atomic step; False where this system or filesystem cannot."""
    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@functools.lru_cache(maxsize=1)
def _exchange_call() -> Optional[Callable[[bytes, bytes], int]]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(a, b, rename_swap)
    return None


def _recover(folder: str) -> None:
    """Put the index back where a restore without an atomic exchange was killed between its two renames."""
    replaced = folder + REPLACED_SUFFIX
    if not os.path.exists(folder) and os.path.isdir(replaced):
        logger.warning("%s: a restore was interrupted while it replaced the index; putting back the index it "
                       "replaced, from %s", folder, replaced)
        os.replace(replaced, folder)


def _remove(folder: str, what: str) -> None:
    if not os.path.lexists(folder):
        return
    try:
        shutil.rmtree(folder)
    except OSError as e:
        logger.warning("cannot remove %s at %s (%s); the next restore tries again", what, folder, e)
