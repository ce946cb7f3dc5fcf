"""Portable snapshots of a VectorStore: one zip file with vectors, metadata, model name,
schema version and a SHA-256 of every part.

    manifest.json   {"format": 1, "schema_version", "model", "dim", "count", "sha256": {...}}
    records.jsonl   one JSON object per document, in the order of the vectors
    vectors.f32     count x dim float32, row-major

Restoring verifies the whole file first and refuses a corrupt, truncated or mismatched one
(another model or dimension than the index it replaces) before anything is touched.
"""

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import asdict
from typing import Dict, Optional

import numpy as np

from executors.store.vector_store import SCHEMA_VERSION, Record, StoreError, VectorStore

FORMAT = 1
BATCH = 4096


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
            if manifest.get("format") != FORMAT:
                raise SnapshotError(f"{path}: snapshot format {manifest.get('format')} is not {FORMAT}")
            if manifest.get("schema_version") != SCHEMA_VERSION:
                raise SnapshotError(f"{path}: made with index schema {manifest.get('schema_version')}, "
                                    f"this clipseek reads schema {SCHEMA_VERSION}")
            for name, expected in manifest["sha256"].items():
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


def restore(path: str, folder: str, *, expect_model: Optional[str] = None) -> Dict:
    """Replace the index in ``folder`` by the snapshot ``path``, after verifying it whole.

    Refuses a snapshot of another model or dimension than the index in ``folder`` holds (clear
    it first to change model) or than ``expect_model``. Stop the servers that use the folder first.
    """
    manifest = verify(path)
    current = VectorStore(folder)
    try:
        if current.count and (current.dim != manifest["dim"] or (current.model and current.model != manifest["model"])):
            raise SnapshotError(
                f"{path} holds {manifest['dim']}-d embeddings of {manifest['model']!r}; the index at {folder} holds "
                f"{current.dim}-d embeddings of {current.model!r}. Clear the index first to replace it with another model's")
        if expect_model and manifest["model"] and manifest["model"] != expect_model:
            raise SnapshotError(f"{path} holds embeddings of {manifest['model']!r}, not of {expect_model!r}")
        current.clear()  # takes the writer lock: refused while a server writes to this index
        # the rows travel as float32; they are stored again as the snapshot's index stored them
        # (snapshots written before this was recorded keep the dtype of the index they replace)
        dtype = manifest.get("storage_dtype") or current.dtype
        staged = folder.rstrip("/") + ".restoring"
        shutil.rmtree(staged, ignore_errors=True)
    finally:
        current.close()
    fresh = VectorStore(staged, dtype=dtype)
    try:
        with zipfile.ZipFile(path) as zf, zf.open("vectors.f32") as vec_in, zf.open("records.jsonl") as rec_in:
            row_bytes = manifest["dim"] * 4
            while True:
                lines = [rec_in.readline() for _ in range(BATCH)]
                lines = [line for line in lines if line]
                if not lines:
                    break
                vectors = np.frombuffer(vec_in.read(row_bytes * len(lines)), dtype="<f4").reshape(len(lines), -1)
                records = [Record(**json.loads(line.decode("utf-8", "surrogateescape"))) for line in lines]
                fresh.upsert(vectors, records, model=manifest["model"])
    finally:
        fresh.close()
    old = folder.rstrip("/") + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(staged, folder)
    shutil.rmtree(old, ignore_errors=True)
    return manifest
