"""On-disk vector store: float32 vectors in a memory-mapped file, metadata in SQLite.

Layout of a store folder (created user-only, 0700 / 0600):

- ``vectors.f32``: rows of ``dim`` float32, row ``r`` at byte ``r * dim * 4``; the file
  grows in chunks and is only ever read through a read-only memory map. A store made with
  ``dtype="float16"`` keeps ``vectors.f16`` instead (half the bytes, row ``r`` at
  ``r * dim * 2``); its dtype is recorded in ``meta`` so every later opener reads it right,
  and the scan converts each chunk to float32 before the dot products.
- ``meta.sqlite`` (WAL mode): table ``rows`` (one per live document: row number, id,
  uri, tags, file facts) and table ``meta`` (schema version, dim, model, storage dtype,
  high-water row count, generation).
- ``write.lock``: held (flock) by the one process that writes.

Commit protocol, so that a kill at any moment leaves a consistent store: new vectors are
written past the committed high-water mark and synced to disk; then one SQLite
transaction inserts their rows and moves the high-water mark. Rows past the mark are
ignored and overwritten. An upsert writes a new row and re-points the id, so a reader
never sees a half-written vector under a committed id, and a deleted row is never
matched again. Readers in other processes see each commit at their next search.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from executors.store import filters
from executors.store.scan import F16_CHUNK_ROWS, top_k
from executors.params import dtype_name, worker_threads

SCHEMA_VERSION = 1
VECTORS_FILE = "vectors.f32"
VECTORS_FILE_F16 = "vectors.f16"
# storage dtype name -> (file name, numpy dtype); a store without a recorded dtype is float32.
STORAGE = {"float32": (VECTORS_FILE, np.float32), "float16": (VECTORS_FILE_F16, np.float16)}
DB_FILE = "meta.sqlite"
LOCK_FILE = "write.lock"
# Values per SQL "IN (...)": well under SQLite's limit of bound parameters in one statement.
SQL_IN_CHUNK = 500
META_COLUMNS = ("uri", "tags", "content_hash", "mtime", "size", "width", "height", "indexed_at", "taken", "taken_from",
                "camera", "latitude", "longitude", "source", "t")
# Columns added after schema version 1 was fixed: an index made before them gains them when it is opened.
ADDED_COLUMNS = (("taken", "REAL"), ("taken_from", "TEXT"), ("camera", "TEXT"), ("latitude", "REAL"),
                 ("longitude", "REAL"), ("source", "TEXT"), ("t", "REAL"))

logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """A request the store refuses; the message says why."""


class StoreLockedError(StoreError):
    """Another process holds the store for writing."""


@dataclass
class Record:
    """Metadata of one stored vector."""

    id: str
    uri: Optional[str] = None
    tags: Dict[str, Any] = field(default_factory=dict)
    content_hash: Optional[str] = None
    mtime: Optional[float] = None
    size: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    indexed_at: Optional[float] = None
    taken: Optional[float] = None  # when the picture was taken (EXIF, else the file's mtime: see taken_from)
    taken_from: Optional[str] = None
    camera: Optional[str] = None
    latitude: Optional[float] = None
    longitude: Optional[float] = None
    # A moment of a video: ``source`` is the id of the video (every moment of it shares its uri), ``t`` the
    # moment's time in seconds. None for a picture.
    source: Optional[str] = None
    t: Optional[float] = None


class VectorStore:
    """Exact cosine search over unit vectors kept on disk."""

    def __init__(self, path: str, *, growth_rows: int = 16384, chunk_rows: int = 65536,
                 dtype: Optional[str] = None, read_only: bool = False):
        """``dtype`` (``float32`` or ``float16``) is the storage type of a new or empty store;
        ``None`` keeps what the store records (float32 for a new one). Asking an index that already
        holds vectors for another dtype raises StoreError. A ``read_only`` store never takes the writer
        lock: every write raises StoreError (it still sees what the writer commits)."""
        self.path = os.path.abspath(path)
        self.read_only = bool(read_only)
        self._requested_dtype = storage_dtype_name(dtype) if dtype is not None else None
        self.growth_rows = int(growth_rows)
        self.chunk_rows = int(chunk_rows)
        self.f16_chunk_rows = F16_CHUNK_ROWS
        # What multiplies the chunks: "numpy", "torch", or "auto" = numpy's BLAS for float32 rows and torch
        # (when installed) for float16 rows, which it multiplies without widening them first
        # (benchmarks/indexer_bench.py times both).
        self.scan = "auto"
        # Threads that scan chunks side by side (numpy scans; torch uses its own threads).
        self.scan_threads = worker_threads()
        self._pool = None
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        _make_private(self.path)  # a folder made by someone else first (jina makes the executor's workspace) too
        db_path = os.path.join(self.path, DB_FILE)
        _touch_private(db_path)
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        self._write_fd: Optional[int] = None
        self._lock_fd: Optional[int] = None
        self._capacity = 0
        self._write_dtype: Optional[str] = None
        self._generation: Optional[int] = None
        self._epoch = 0  # of the rows in the current view: clear() starts a new epoch and reuses row numbers
        self._view: Optional[np.ndarray] = None
        self._live = np.zeros(0, dtype=bool)
        self._init_schema()

    # ---- schema and meta -------------------------------------------------------------
    def _init_schema(self) -> None:
        with self._transaction():
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS rows (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, uri TEXT, "
                "tags TEXT NOT NULL DEFAULT '{}', content_hash TEXT, mtime REAL, size INTEGER, width INTEGER, "
                "height INTEGER, indexed_at REAL)"
            )
            have = {row[1] for row in self._db.execute("PRAGMA table_info(rows)")}
            for name, kind in ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE rows ADD COLUMN {name} {kind}")
            self._db.execute("CREATE INDEX IF NOT EXISTS rows_uri ON rows(uri)")
            self._db.execute("CREATE INDEX IF NOT EXISTS rows_taken ON rows(taken)")
            self._db.execute("CREATE INDEX IF NOT EXISTS rows_source ON rows(source)")
            for key, value in (("schema_version", SCHEMA_VERSION), ("high_water", 0), ("generation", 0)):
                self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, str(value)))
            wanted = self._requested_dtype
            if wanted is not None and wanted != self._meta("dtype") and not self.read_only:
                have, committed = self.dtype, int(self._meta("high_water") or 0)
                if committed and have != wanted:
                    raise StoreError(
                        f"index at {self.path} stores {have} vectors; it cannot be opened as {wanted} while it "
                        f"holds vectors. Use another workspace, or clear the index first"
                    )
                self._set_meta("dtype", wanted)  # an empty store takes the dtype it is asked for
        version = int(self._meta("schema_version"))
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"index at {self.path} has schema version {version}; this clipseek reads version {SCHEMA_VERSION}. "
                f"Re-index into a new workspace (or restore a snapshot made by a matching version)."
            )
        high_water, dim = int(self._meta("high_water")), self.dim
        if dim and high_water:
            file_name, np_dtype = STORAGE[self.dtype]
            path = os.path.join(self.path, file_name)
            needed = high_water * dim * np.dtype(np_dtype).itemsize
            have = os.path.getsize(path) if os.path.exists(path) else 0
            if have < needed:
                raise StoreError(f"index at {self.path} is damaged: {file_name} holds {have} bytes, "
                                 f"{high_water} committed rows need {needed}")

    def _transaction(self, immediate: bool = True):
        return _Transaction(self._db, immediate)

    def _meta(self, key: str) -> Optional[str]:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, None if value is None else str(value)))

    @property
    def dim(self) -> Optional[int]:
        value = self._meta("dim")
        return int(value) if value else None

    @property
    def dtype(self) -> str:
        """Storage dtype of the vectors: ``float32`` (also for stores made before dtypes existed) or ``float16``."""
        value = self._meta("dtype")
        if value and value not in STORAGE:
            raise StoreError(f"index at {self.path} records storage dtype {value!r}, which this clipseek cannot read")
        return value or "float32"

    @property
    def model(self) -> Optional[str]:
        return self._meta("model") or None

    @property
    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM rows").fetchone()[0]

    def bytes_on_disk(self) -> int:
        total = 0
        for name in os.listdir(self.path):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                continue
        return total

    # ---- writing -----------------------------------------------------------------------
    def _acquire_writer(self) -> None:
        if self._lock_fd is not None:
            return
        if self.read_only:
            raise StoreError(f"index at {self.path} is open read-only here; writes go through the index flow")
        self._lock_fd = lock_writer(self.path, "stop that process or use another workspace")

    def _vectors_file(self, dtype: str) -> str:
        return os.path.join(self.path, STORAGE[dtype][0])

    def _open_vectors_for_write(self, dtype: str) -> int:
        if self._write_fd is not None and self._write_dtype != dtype:
            os.close(self._write_fd)
            self._write_fd = None
        if self._write_fd is None:
            path = self._vectors_file(dtype)
            created = not os.path.exists(path)
            self._write_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if created:  # the file's name reaches the disk before any row that needs it is committed
                sync_folder(self.path)
            self._write_dtype = dtype
            self._capacity = 0
        return self._write_fd

    def _ensure_capacity(self, rows: int, dim: int, dtype: str) -> None:
        fd = self._open_vectors_for_write(dtype)
        row_bytes = dim * np.dtype(STORAGE[dtype][1]).itemsize
        current = os.fstat(fd).st_size // row_bytes
        if current >= rows:
            self._capacity = current
            return
        grown = max(rows, current + self.growth_rows)
        grown = -(-grown // self.growth_rows) * self.growth_rows
        os.ftruncate(fd, grown * row_bytes)
        self._capacity = grown

    def check_compatible(self, dim: int, model: Optional[str]) -> None:
        """Raise StoreError if vectors of this dim / model cannot join the store."""
        have_dim, have_model = self.dim, self.model
        if have_dim and have_dim != dim:
            raise StoreError(
                f"index at {self.path} holds {have_dim}-d embeddings (model {have_model}); got {dim}-d "
                f"(model {model}). Use another workspace, or clear the index first"
            )
        if have_model and model and have_model != model:
            raise StoreError(
                f"index at {self.path} holds embeddings of model {have_model!r}; got embeddings of model {model!r}. "
                f"Use another workspace, or clear the index first"
            )

    def upsert(self, vectors: np.ndarray, records: Sequence[Record], model: Optional[str] = None, *,
               keep_indexed_at: bool = False, replace_sources: bool = False) -> None:
        """Add or replace ``records`` (ids unique within the call, and uris too but for the moments of one
        video, which share its uri) with their ``vectors``. A record whose ``uri`` is already stored under
        another id (and another source) replaces that entry: one entry per picture.

        Each row is stamped with the time of this write as its ``indexed_at``; with ``keep_indexed_at``
        a record that carries its own ``indexed_at`` keeps it (a restored snapshot keeps its times).
        With ``replace_sources`` the moments given for a video are all it has: its stored moments at other times
        go (a video that changed); without it, moments add to those stored (a video written in several calls)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(records):
            raise StoreError(f"expected {len(records)} vectors as a 2-d array, got shape {vectors.shape}")
        if not len(records):
            return
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            raise StoreError("ids must be unique within one upsert")
        by_uri: Dict[str, List[Record]] = {}
        for r in records:
            if r.uri:
                by_uri.setdefault(r.uri, []).append(r)
        for shared in (rs for rs in by_uri.values() if len(rs) > 1):
            if shared[0].source is None or len({r.source for r in shared}) > 1 or len({r.t for r in shared}) < len(shared):
                raise StoreError("uris must be unique within one upsert (but for the moments of one video)")
        if not np.isfinite(vectors).all():
            raise StoreError("vectors contain NaN or infinity")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise StoreError("vectors contain an all-zero row (no direction to compare)")
        vectors = np.ascontiguousarray(vectors / norms, dtype=np.float32)
        n, dim = vectors.shape
        self.check_compatible(dim, model)
        with self._lock:
            self._acquire_writer()
            high_water = int(self._meta("high_water"))
            dtype = self.dtype
            np_dtype = STORAGE[dtype][1]
            self._ensure_capacity(high_water + n, dim, dtype)
            fd = self._open_vectors_for_write(dtype)
            _pwrite_all(fd, vectors.astype(np_dtype, copy=False).tobytes(), high_water * dim * np.dtype(np_dtype).itemsize)
            os.fdatasync(fd)
            now = time.time()
            with self._transaction():
                self.check_compatible(dim, model)
                if self.dtype != dtype:  # another opener switched the (then empty) store meanwhile
                    raise StoreError(f"index at {self.path} changed its storage dtype to {self.dtype} during this write; retry")
                if not self.dim:
                    self._set_meta("dim", dim)
                if model and not self.model:
                    self._set_meta("model", model)
                # one entry per picture: a uri stored under another id is that entry, replaced by this one
                self._db.executemany("DELETE FROM rows WHERE uri = ? AND id != ? AND (source IS NULL OR source IS NOT ?)",
                                     [(r.uri, r.id, r.source) for r in records if r.uri])
                if replace_sources:
                    self._db.executemany("DELETE FROM rows WHERE source = ?",
                                         [(source,) for source in sorted({r.source for r in records if r.source})])
                self._db.executemany(
                    "INSERT INTO rows (row, id, uri, tags, content_hash, mtime, size, width, height, indexed_at, "
                    "taken, taken_from, camera, latitude, longitude, source, t) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET row=excluded.row, "
                    "uri=excluded.uri, tags=excluded.tags, content_hash=excluded.content_hash, mtime=excluded.mtime, "
                    "size=excluded.size, width=excluded.width, height=excluded.height, indexed_at=excluded.indexed_at, "
                    "taken=excluded.taken, taken_from=excluded.taken_from, camera=excluded.camera, "
                    "latitude=excluded.latitude, longitude=excluded.longitude, source=excluded.source, t=excluded.t",
                    [
                        (high_water + i, r.id, r.uri, json.dumps(r.tags or {}), r.content_hash, r.mtime, r.size,
                         r.width, r.height, r.indexed_at if keep_indexed_at and r.indexed_at is not None else now,
                         r.taken, r.taken_from, r.camera, r.latitude, r.longitude, r.source, r.t)
                        for i, r in enumerate(records)
                    ],
                )
                self._set_meta("high_water", high_water + n)
                self._bump_generation()

    def _epoch_on_disk(self) -> int:
        return int(self._meta("epoch") or 0)

    def _bump_generation(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def delete(self, ids: Iterable[str]) -> int:
        """Remove these ids; the id of a video removes all its moments. Returns the rows removed."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            self._acquire_writer()
            with self._transaction():
                deleted = 0
                for marks, part in _in_chunks(ids):
                    deleted += self._db.execute(f"DELETE FROM rows WHERE id IN ({marks}) OR source IN ({marks})",
                                                part + part).rowcount
                if deleted:
                    self._bump_generation()
            return deleted

    def update_tags(self, tags_by_id: Mapping[str, Mapping[str, Any]]) -> List[str]:
        """Add ``tags`` (keys given replace the same keys, others stay) to stored documents, without touching
        their vectors; returns the ids found."""
        if not tags_by_id:
            return []
        with self._lock:
            self._acquire_writer()
            with self._transaction():
                current, owner = {}, {}  # row id -> its tags; row id -> the id it was asked by (a video's moments)
                for marks, part in _in_chunks(list(tags_by_id)):
                    for rid, tags, source in self._db.execute(
                            f"SELECT id, tags, source FROM rows WHERE id IN ({marks}) OR source IN ({marks})", part + part):
                        current[rid] = tags
                        owner[rid] = rid if rid in tags_by_id else source
                self._db.executemany("UPDATE rows SET tags = ? WHERE id = ?",
                                     [(json.dumps({**json.loads(current[i] or "{}"), **dict(tags_by_id[owner[i]])}), i)
                                      for i in current])
            return sorted(set(owner.values()))

    def evict(self, ids: Sequence[str], uris: Sequence[str]) -> int:
        """Remove the rows of these ids and of these uris (a shard dropping what another shard now owns)."""
        ids, uris = list(ids), [u for u in uris if u]
        if not ids and not uris:
            return 0
        with self._lock:
            present = self._db.execute("SELECT 1 FROM rows LIMIT 1").fetchone()
            if present is None:
                return 0
            removed = 0
            found = [i for marks, part in _in_chunks(ids)
                     for (i,) in self._db.execute(f"SELECT id FROM rows WHERE id IN ({marks})", part)]
            found += [i for marks, part in _in_chunks(uris)
                      for (i,) in self._db.execute(f"SELECT id FROM rows WHERE uri IN ({marks})", part)]
            found += [i for marks, part in _in_chunks(ids)
                      for (i,) in self._db.execute(f"SELECT id FROM rows WHERE source IN ({marks})", part)]
            if found:
                removed = self.delete(sorted(set(found)))
            return removed

    def check_shards(self, shard_id: int, shards: int) -> None:
        """Record the shard layout this store belongs to (``shard_id`` of ``shards``), or StoreError if it
        was written as part of another layout: a document's shard is a hash of its id over the number of
        shards, so another number would look for each picture on the wrong shard."""
        recorded = self._meta("shards")
        have = shards_of({"shards": recorded, "high_water": self._meta("high_water")})
        if have is not None and have != shards:
            raise StoreError(f"index at {self.path} was written by {have} shard(s); this flow runs {shards}. "
                             f"Start it with --shards {have} (or index into a new workspace)")
        if recorded is None and not self.read_only:
            with self._transaction():
                self._set_meta("shards", shards)

    def clear(self) -> int:
        """Remove every row, the dim and the model; the space on disk is given back."""
        with self._lock:
            self._acquire_writer()
            with self._transaction():
                removed = self._db.execute("DELETE FROM rows").rowcount
                self._db.execute("DELETE FROM meta WHERE key IN ('dim', 'model')")
                self._set_meta("high_water", 0)
                # row numbers start again at 0: a reader that mapped the rows before compares epochs
                self._set_meta("epoch", self._epoch_on_disk() + 1)
                self._bump_generation()
            # A fresh file replaces the old one; readers keep their map of the old one until they re-map.
            vectors_path = self._vectors_file(self.dtype)
            tmp = vectors_path + ".new"
            os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
            os.replace(tmp, vectors_path)
            sync_folder(self.path)  # the empty file replaces the old one on disk before any new row is committed
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None
            return removed

    # ---- reading -----------------------------------------------------------------------
    def _refresh(self) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """The committed vectors (read-only map) and the live-row mask, re-read after each commit."""
        generation = int(self._meta("generation"))
        if generation == self._generation:
            return self._view, self._live
        with self._transaction(immediate=False):
            generation = int(self._meta("generation"))
            high_water = int(self._meta("high_water"))
            dim = self.dim
            dtype = self.dtype
            rows = np.fromiter((r for (r,) in self._db.execute("SELECT row FROM rows")), dtype=np.int64)
            self._epoch = self._epoch_on_disk()
        live = np.zeros(high_water, dtype=bool)
        live[rows] = True
        view = None
        if high_water and dim:
            view = np.memmap(self._vectors_file(dtype), dtype=STORAGE[dtype][1], mode="r", shape=(high_water, dim))
        self._view, self._live, self._generation = view, live, generation
        return view, live

    def search(self, queries: np.ndarray, limit: int = 10, min_score: Optional[float] = None,
               where: Optional[Mapping[str, Any]] = None,
               one_per_source: bool = False) -> List[List[Tuple[Record, float]]]:
        """Top-``limit`` cosine matches per query, best first, among rows matching ``where``. With
        ``one_per_source`` a video gives at most its best moment: the top-``limit`` sources."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        norms = np.linalg.norm(queries, axis=-1, keepdims=True)  # scores are cosines whatever the query's length
        queries = queries / np.where(norms > 0, norms, 1).astype(np.float32)
        if limit < 1:
            raise StoreError(f"limit must be at least 1, got {limit}")
        for _ in range(3):
            try:
                if one_per_source:
                    return self._search_sources(queries, limit, min_score, where)
                return self._search_once(queries, limit, min_score, where)
            except _EpochChanged:
                continue  # cleared while this search ran: its row numbers name other rows now; again on the new ones
        raise StoreError(f"index at {self.path} was cleared three times during one search; retry")

    def _search_sources(self, queries: np.ndarray, limit: int, min_score: Optional[float],
                        where: Optional[Mapping[str, Any]]) -> List[List[Tuple[Record, float]]]:
        """The top-``limit`` sources (a picture, or a video by its best moment): more rows are scanned for, four
        times as many each round, until each query has ``limit`` sources or no more rows match."""
        fetch, rows = limit, max(self.count, 1)  # counted once: a round that runs short of rows ends the scan anyway
        while True:
            found = self._search_once(queries, fetch, min_score, where)
            kept = [_best_per_source(hits, limit) for hits in found]
            if fetch >= rows or all(len(k) >= limit or len(h) < fetch for k, h in zip(kept, found)):
                return kept
            fetch = min(fetch * 4, rows)

    def _search_once(self, queries: np.ndarray, limit: int, min_score: Optional[float],
                     where: Optional[Mapping[str, Any]]) -> List[List[Tuple[Record, float]]]:
        with self._lock:
            view, live = self._refresh()
            epoch = self._epoch
            if view is None:
                return [[] for _ in queries]
            if queries.shape[1] != view.shape[1]:
                raise StoreError(f"query has {queries.shape[1]} dimensions; the index at {self.path} holds {view.shape[1]}")
            mask = live
            if where:
                mask = live & self._rows_matching(where, len(live))
            scores, rows = top_k(view, mask, queries, limit, min_score, scan=self.scan, chunk_rows=self.chunk_rows,
                                 f16_chunk_rows=self.f16_chunk_rows,
                                 pool=self._scan_pool if self.scan_threads > 1 else None, threads=self.scan_threads)
        results = []
        wanted = sorted({int(r) for r in rows.ravel() if r >= 0})
        records = self._records_by_row(wanted, epoch)
        for q_scores, q_rows in zip(scores, rows):
            hits = []
            for score, row in zip(q_scores, q_rows):
                record = records.get(int(row)) if row >= 0 else None
                if record is not None:  # a row deleted since the mask was read is dropped
                    hits.append((record, float(score)))
            results.append(hits)
        return results

    def _scan_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.scan_threads, thread_name_prefix="clipseek-scan")
        return self._pool

    def _rows_matching(self, where: Mapping[str, Any], size: int) -> np.ndarray:
        condition, params = filters.to_sql(where)
        mask = np.zeros(size, dtype=bool)
        rows = np.fromiter((r for (r,) in self._db.execute(f"SELECT row FROM rows WHERE {condition}", params)), dtype=np.int64)
        rows = rows[rows < size]
        mask[rows] = True
        return mask

    def _records_by_row(self, rows: Sequence[int], epoch: Optional[int] = None) -> Dict[int, Record]:
        """The records of these row numbers, read in one transaction; with ``epoch`` (that of the view the rows
        were found in), _EpochChanged if the index was cleared since, so that the rows now name other pictures."""
        out: Dict[int, Record] = {}
        with self._transaction(immediate=False):
            for marks, part in _in_chunks(rows):
                for row in self._db.execute(f"SELECT row, id, {', '.join(META_COLUMNS)} FROM rows WHERE row IN ({marks})",
                                            part):
                    out[row[0]] = _record(row[1:])
            if epoch is not None and self._epoch_on_disk() != epoch:
                raise _EpochChanged()
        return out

    def get(self, ids: Sequence[str]) -> Dict[str, Record]:
        """Stored metadata of these ids (missing ids are left out); the id of a video gives its first moment."""
        out: Dict[str, Record] = {}
        for marks, part in _in_chunks(ids):
            for row in self._db.execute(f"SELECT id, {', '.join(META_COLUMNS)} FROM rows WHERE id IN ({marks})", part):
                out[row[0]] = _record(row)
        missing = [i for i in ids if i not in out]
        for marks, part in _in_chunks(missing):
            for row in self._db.execute(f"SELECT id, {', '.join(META_COLUMNS)} FROM rows WHERE source IN ({marks}) "
                                        f"ORDER BY t", part):
                record = _record(row)
                out.setdefault(record.source, record)  # the earliest moment
        return out

    def vectors(self, ids: Sequence[str]) -> Dict[str, np.ndarray]:
        """Stored vectors of these ids, read from the map (missing ids are left out)."""
        ids = list(ids)
        with self._lock:
            for _ in range(3):
                view, _ = self._refresh()
                if view is None or not ids:
                    return {}
                found = {}
                with self._transaction(immediate=False):
                    for marks, part in _in_chunks(ids):
                        found.update(self._db.execute(f"SELECT id, row FROM rows WHERE id IN ({marks})", part).fetchall())
                    current = self._epoch_on_disk() == self._epoch  # else cleared since the map: rows are new
                if current:
                    return {i: np.array(view[r], dtype=np.float32) for i, r in found.items() if r < len(view)}
            raise StoreError(f"index at {self.path} was cleared three times during one read; retry")

    def iter_records(self, batch: int = 1000) -> Iterable[Tuple[int, Record]]:
        """Every live (row, record), in row order."""
        last = -1
        while True:
            rows = self._db.execute(
                f"SELECT row, id, {', '.join(META_COLUMNS)} FROM rows WHERE row > ? ORDER BY row LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield row[0], _record(row[1:])
            last = rows[-1][0]

    def near_duplicates(self, threshold: float = 0.95, block_rows: int = 8192) -> List[List[Tuple[Record, float]]]:
        """Groups of live documents whose vectors have cosine >= ``threshold`` (linked transitively),
        computed block by block over the map so memory stays at two blocks and their products.
        Each group is (record, best cosine to another member), largest groups first."""
        with self._lock:
            view, live = self._refresh()
            if view is None:
                return []
            rows = np.flatnonzero(live)
            parent = {int(r): int(r) for r in rows}
            # the moments of one video look alike: they are one source, not duplicates of each other
            video_of = dict(self._db.execute("SELECT row, source FROM rows WHERE source IS NOT NULL").fetchall())
            best: Dict[int, float] = {}

            def find(x: int) -> int:
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            for i in range(0, len(rows), block_rows):
                a_rows = rows[i : i + block_rows]
                a = np.asarray(view[a_rows], dtype=np.float32)
                for j in range(i, len(rows), block_rows):
                    b_rows = rows[j : j + block_rows]
                    sims = a @ np.asarray(view[b_rows], dtype=np.float32).T
                    if i == j:
                        sims = np.triu(sims, k=1)
                    for x, y in zip(*np.nonzero(sims >= threshold)):
                        ra, rb, sim = int(a_rows[x]), int(b_rows[y]), float(sims[x, y])
                        if video_of and video_of.get(ra) is not None and video_of.get(ra) == video_of.get(rb):
                            continue
                        best[ra] = max(best.get(ra, -1.0), sim)
                        best[rb] = max(best.get(rb, -1.0), sim)
                        parent[find(ra)] = find(rb)
            groups: Dict[int, List[int]] = {}
            for row in best:
                groups.setdefault(find(row), []).append(row)
        records = self._records_by_row(sorted(best))
        out = [[(records[r], best[r]) for r in sorted(members) if r in records] for members in groups.values()]
        out = [g for g in out if len(g) > 1]
        return sorted(out, key=lambda g: (-len(g), g[0][0].id))

    def page_by_id(self, after_id: str = "", limit: int = 1000) -> List[Record]:
        """Up to ``limit`` records with ids above ``after_id``, in id order (stable paging)."""
        rows = self._db.execute(f"SELECT id, {', '.join(META_COLUMNS)} FROM rows WHERE id > ? ORDER BY id LIMIT ?",
                                (after_id, int(limit))).fetchall()
        return [_record(row) for row in rows]

    def status(self) -> Dict[str, Any]:
        return {"count": self.count, "dim": self.dim, "model": self.model, "bytes_on_disk": self.bytes_on_disk(),
                "schema_version": SCHEMA_VERSION, "path": self.path}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            self._view = None
            self._db.close()


class _EpochChanged(Exception):
    """The index was cleared between reading its rows and reading their records."""


class _Transaction:
    def __init__(self, db: sqlite3.Connection, immediate: bool):
        self.db, self.immediate = db, immediate

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def lock_writer(folder: str, advice: str) -> int:
    """Take the writer lock of the store in ``folder`` (a file descriptor holding ``write.lock`` with this
    process's pid in it), or StoreLockedError naming the holder's pid and ``advice``."""
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLockedError(f"index at {folder} is open for writing by another process (pid {holder}); "
                               f"{advice}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def recorded_meta(folder: str) -> Dict[str, str]:
    """The meta table (shards, model, high_water ...) of the first shard's store of the index whose shard
    folders (0, 1, ...) lie in ``folder``, read without opening it for writing; {} when there is none."""
    db_path = os.path.join(folder, "0", DB_FILE)
    if not os.path.exists(db_path):
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)
    try:
        return {k: v for k, v in db.execute("SELECT key, value FROM meta").fetchall() if v is not None}
    except sqlite3.DatabaseError:
        return {}  # the store reports a damaged index itself when it opens
    finally:
        db.close()


def shards_of(meta: Mapping[str, Optional[str]]) -> Optional[int]:
    """How many shards wrote a store, from its meta table: as recorded, 1 for a store made before shards
    were recorded that holds rows, None for an empty one that records nothing."""
    if meta.get("shards"):
        return int(meta["shards"])
    return 1 if int(meta.get("high_water") or 0) else None


def storage_dtype_name(dtype: Any) -> str:
    """``float32`` or ``float16`` for any spelling of them (numpy dtypes too); anything else is refused."""
    return dtype_name(dtype, tuple(STORAGE), what="storage dtype", error=StoreError)


def _in_chunks(values: Sequence[Any], size: int = SQL_IN_CHUNK) -> Iterator[Tuple[str, List[Any]]]:
    """``values`` in slices small enough for one SQL ``IN (...)``: (the ``?, ?, ...`` marks, the slice)."""
    values = list(values)
    for start in range(0, len(values), size):
        part = values[start : start + size]
        yield ",".join("?" * len(part)), part


def _best_per_source(hits: List[Tuple[Record, float]], limit: int) -> List[Tuple[Record, float]]:
    """``hits`` (best first) with only the first hit of each source (a video's best moment), at most ``limit``."""
    seen, out = set(), []
    for record, score in hits:
        key = record.source or record.id
        if key not in seen:
            seen.add(key)
            out.append((record, score))
            if len(out) == limit:
                break
    return out


def _record(row: Sequence[Any]) -> Record:
    rid, uri, tags, content_hash, mtime, size, width, height, indexed_at, *when_where = row
    return Record(rid, uri, json.loads(tags or "{}"), content_hash, mtime, size, width, height, indexed_at, *when_where)


def sync_folder(folder: str) -> None:
    """fsync a folder, so that the files created or renamed in it are on disk under their names (POSIX
    promises a file's name is durable only once its folder is synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private(folder: str) -> None:
    """Take group and other permissions off ``folder`` (the store's own folder: the index is the user's alone)."""
    try:
        mode = os.stat(folder).st_mode & 0o777
        if mode & 0o077:
            os.chmod(folder, mode & 0o700)
    except OSError as e:
        logger.warning("cannot make %s private (%s): its files stay user-only", folder, e)


def _touch_private(path: str) -> None:
    if not os.path.exists(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
