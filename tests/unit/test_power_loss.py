"""Power loss: record what the store writes and syncs while it indexes, rebuild every state the disk
could hold had the power been cut at one of those moments, and open each as an index.

A SIGKILL (tests/e2e/test_crash.py) keeps the page cache: every write the kernel accepted reaches the
disk, so those tests never see the ordering of the syncs. A power cut keeps only what was synced. The
disk modelled here, in the spirit of SQLite's crash tests:

- SQLite (WAL, ``synchronous=FULL``) is atomic per transaction: after a cut the database is as one of
  its commits left it. Its files are copied as they are after each commit; a cut just before a commit
  gets the previous copy, one just after gets the new one.
- A write to any other file of the store (``vectors.f32`` / ``vectors.f16``) is on disk for certain
  once an fsync/fdatasync of that file has returned. Until then each 512-byte sector it touched may
  hold the new bytes, the old ones, or garbage (a torn write); a size change (ftruncate, a write past the
  end) may or may not have happened.
- Names (a file created, ``os.replace``): on a journaling file system (ext4, XFS) they reach the disk in
  order and are all there once a later fsync/fdatasync of any file has returned (the ``journal`` model).
  POSIX promises less: a name is on disk once the folder itself was fsync'ed (fsync(2): "an explicit
  fsync() on a file descriptor for the directory is also needed"), which SQLite does on the first
  commit of each connection and the store does after creating or replacing its vectors file (the
  ``posix`` model).

Every state must open as a consistent index: VectorStore(path) opens; it holds exactly the documents of
the SQLite commit it was cut after, each with the vector written for it, bit for bit; search finds them
all with the right scores and nothing else; and it takes further writes. The figures of a run are
printed with -s and kept in ``POWER_LOSS_FIGURES``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from executors.store import vector_store
from executors.store.vector_store import DB_FILE, Record, VectorStore

DIM = 48  # 192-byte float32 rows, 96-byte float16 rows: sectors cut rows in the middle
SECTOR = 512
RANDOM_VARIANTS = 6  # random disk states per cut, besides the extreme ones
SQLITE_FILES = (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm")
POWER_LOSS_FIGURES: Dict[str, Dict[str, int]] = {}

# id -> (uri, the vector as stored: normalized, in the storage dtype, read back as float32)
Expected = Dict[str, Tuple[str, np.ndarray]]


@dataclass
class Cut:
    """One moment the power could go: the disk then, before the crash picks what of it survives."""

    label: str
    sqlite: Dict[str, bytes]  # the SQLite files as the last commit left them
    sqlite_commit: int
    expected: Expected  # what that commit holds
    names: Dict[str, int]  # name -> inode, on disk for certain
    pending_names: List[tuple]  # ("link", name, inode) / ("rename", src, dst), not yet synced
    files: Dict[int, Tuple[bytes, List[tuple]]]  # inode -> (bytes on disk for certain, unsynced changes)


class Disk:
    """The store's own files (SQLite's aside) as the process sees them and as the disk holds them."""

    def __init__(self, folder: str, names_model: str):
        assert names_model in ("journal", "posix")
        self.folder = os.path.abspath(folder)
        self.names_model = names_model
        self.durable: Dict[int, bytearray] = {}
        self.pending: Dict[int, List[tuple]] = {}  # ("write", offset, bytes) / ("truncate", size)
        self.live: Dict[str, int] = {}
        self.names: Dict[str, int] = {}
        self.pending_names: List[tuple] = []
        self.fds: Dict[int, object] = {}  # fd -> inode, or "folder"
        self.sqlite: Dict[str, bytes] = {}
        self.sqlite_commit = 0
        self.expected: Expected = {}
        self.next_expected: Expected = {}  # what the write in flight commits
        self.connections_committed = set()
        self.cuts: List[Cut] = []
        self.op = "opening the store"
        self.counts = {"writes": 0, "syncs": 0, "commits": 0}

    # ---- what the store does ----------------------------------------------------------
    def _name(self, path) -> Optional[str]:
        path = os.path.abspath(os.fspath(path))
        if os.path.dirname(path) != self.folder:
            return None
        name = os.path.basename(path)
        return None if name in SQLITE_FILES or name.startswith(DB_FILE) else name

    def opened(self, fd: int, path, flags: int, existed: bool) -> None:
        if os.path.abspath(os.fspath(path)) == self.folder:
            self.fds[fd] = "folder"
            return
        name = self._name(path)
        if name is None:
            return
        assert existed == (name in self.live), f"the model lost track of {name}"
        if name not in self.live:
            ino = len(self.durable)
            self.durable[ino], self.pending[ino] = bytearray(), []
            self.live[name] = ino
            self.pending_names.append(("link", name, ino))
        ino = self.live[name]
        if flags & os.O_TRUNC:
            self.pending[ino].append(("truncate", 0))
        self.fds[fd] = ino

    def closed(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def wrote(self, fd: int, offset: int, data: bytes) -> None:
        ino = self.fds.get(fd)
        if isinstance(ino, int):
            self.pending[ino].append(("write", offset, bytes(data)))
            self.counts["writes"] += 1

    def truncated(self, fd: int, size: int) -> None:
        ino = self.fds.get(fd)
        if isinstance(ino, int):
            self.pending[ino].append(("truncate", size))

    def replaced(self, src, dst) -> None:
        a, b = self._name(src), self._name(dst)
        if a is None or b is None:
            return
        self.live[b] = self.live.pop(a)
        self.pending_names.append(("rename", a, b))

    def syncing(self, fd: int) -> None:
        target = self.fds.get(fd)
        if target is None:
            return
        self.counts["syncs"] += 1
        if target == "folder":
            self.cut("fsync of the folder")
            self._names_synced()
            return
        name = next((n for n, i in self.live.items() if i == target), f"inode {target}")
        self.cut(f"fdatasync of {name}")
        for op in self.pending[target]:
            _apply(self.durable[target], op)
        self.pending[target] = []
        if self.names_model == "journal":
            self._names_synced()

    def committing(self) -> None:
        self.cut("SQLite commit")

    def committed(self, connection) -> None:
        self.counts["commits"] += 1
        self.sqlite = {n: _read(os.path.join(self.folder, n)) for n in SQLITE_FILES
                       if os.path.exists(os.path.join(self.folder, n))}
        self.sqlite_commit += 1
        self.expected = self.next_expected
        if id(connection) not in self.connections_committed:
            # SQLite fsyncs the folder on the first sync of each connection's WAL (os_unix.c, UNIXFILE_DIRSYNC)
            self.connections_committed.add(id(connection))
            self._names_synced()
        elif self.names_model == "journal":  # its fsync commits the journal, names and all
            self._names_synced()
        self.cut("SQLite commit", after=True)

    def _names_synced(self) -> None:
        for op in self.pending_names:
            _apply_name(self.names, op)
        self.pending_names = []

    def cut(self, what: str, after: bool = False) -> None:
        self.cuts.append(Cut(
            label=f"{'after' if after else 'before'} {what}, {self.op} (cut {len(self.cuts)})",
            sqlite=dict(self.sqlite), sqlite_commit=self.sqlite_commit, expected=self.expected,
            names=dict(self.names), pending_names=list(self.pending_names),
            files={ino: (bytes(self.durable[ino]), list(self.pending[ino])) for ino in self.durable},
        ))

    # ---- what a crash leaves -----------------------------------------------------------
    def states(self, cut: Cut, rng: np.random.Generator):
        """(variant, {file name: bytes}) for disk states this cut can leave (SQLite's files aside)."""
        p = len(cut.pending_names)
        unsynced = any(changes for _, changes in cut.files.values())
        variants = [("every unsynced change kept", "keep", p)]
        if unsynced:
            variants += [("every unsynced change lost", "drop", p), ("every unsynced sector garbage", "garbage", p)]
        if p:
            variants += [("unsynced names lost, changes kept", "keep", 0), ("unsynced names and changes lost", "drop", 0)]
        if unsynced or p:
            variants += [(f"random #{i}", "random", int(rng.integers(0, p + 1))) for i in range(RANDOM_VARIANTS)]
        for variant, mode, kept_names in variants:
            names = dict(cut.names)
            for op in cut.pending_names[:kept_names]:
                _apply_name(names, op)
            files = {}
            for name, ino in names.items():
                durable, changes = cut.files[ino]
                files[name] = _crash(durable, changes, mode, rng)
            yield variant, files


def _apply(buf: bytearray, op: tuple) -> None:
    if op[0] == "truncate":
        del buf[op[1]:]
        buf.extend(bytes(op[1] - len(buf)))
    else:
        _, offset, data = op
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset : offset + len(data)] = data


def _apply_name(names: Dict[str, int], op: tuple) -> None:
    if op[0] == "link":
        names[op[1]] = op[2]
    elif op[1] in names:
        names[op[2]] = names.pop(op[1])


def _crash(durable: bytes, changes: List[tuple], mode: str, rng: np.random.Generator) -> bytes:
    """The file after a power cut: ``durable`` and, sector by sector, what of the unsynced ``changes``
    reached the disk (``keep``: all, ``drop``: none, ``garbage``: junk in each sector they touched)."""
    buf = bytearray(durable)
    for op in changes:
        pick = mode if mode != "random" else ("keep", "drop", "garbage")[int(rng.choice(3, p=(0.45, 0.35, 0.2)))]
        if op[0] == "truncate":
            if pick != "drop":
                _apply(buf, op)
            continue
        _, offset, data = op
        start = offset
        while start < offset + len(data):  # one piece per sector
            stop = min(offset + len(data), (start // SECTOR + 1) * SECTOR)
            if mode == "random":
                pick = ("keep", "drop", "garbage")[int(rng.choice(3, p=(0.45, 0.35, 0.2)))]
            if pick == "keep":
                _apply(buf, ("write", start, data[start - offset : stop - offset]))
            elif pick == "garbage":
                _apply(buf, ("write", start, rng.bytes(stop - start)))
            start = stop
    return bytes(buf)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class RecordingOs:
    """The ``os`` the store sees while recording: the real one, telling ``disk`` what it writes and syncs."""

    def __init__(self, disk: Disk):
        self._disk = disk

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, **kwargs):
        existed = os.path.exists(path)
        fd = os.open(path, flags, mode, **kwargs)
        self._disk.opened(fd, path, flags, existed)
        return fd

    def close(self, fd):
        self._disk.closed(fd)
        return os.close(fd)

    def pwrite(self, fd, data, offset):
        written = os.pwrite(fd, data, offset)
        self._disk.wrote(fd, offset, bytes(memoryview(data)[:written]))
        return written

    def write(self, fd, data):
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        written = os.write(fd, data)
        self._disk.wrote(fd, offset, bytes(memoryview(data)[:written]))
        return written

    def ftruncate(self, fd, size):
        os.ftruncate(fd, size)
        self._disk.truncated(fd, size)

    def fdatasync(self, fd):
        self._disk.syncing(fd)
        os.fdatasync(fd)

    def fsync(self, fd):
        self._disk.syncing(fd)
        os.fsync(fd)

    def replace(self, src, dst, **kwargs):
        os.replace(src, dst, **kwargs)
        self._disk.replaced(src, dst)

    def rename(self, src, dst, **kwargs):
        os.rename(src, dst, **kwargs)
        self._disk.replaced(src, dst)


def _recording_exit(disk: Disk, original: Callable):
    def __exit__(self, exc_type, exc, tb):
        if not self.immediate or exc_type is not None:
            return original(self, exc_type, exc, tb)
        disk.committing()
        result = original(self, exc_type, exc, tb)
        disk.committed(self.db)
        return result

    return __exit__


# ---- the workload ------------------------------------------------------------------------
def _vectors(names: List[str], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(names), DIM)).astype(np.float32)


def _stored(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """The rows as the store keeps them (normalized as upsert does it, in the storage dtype)."""
    unit = np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)
    return unit.astype(vector_store.STORAGE[dtype][1]).astype(np.float32)


def record_workload(folder: str, dtype: str, names_model: str,
                    os_class: type = RecordingOs, growth_rows: int = 4) -> Disk:
    """Index into ``folder`` while recording: upserts (new ids, re-upserted ids, a uri taken over by
    another id), deletes, a reopen, a clear and writes after it. Returns the recorded disk."""
    disk = Disk(folder, names_model)
    state: Expected = {}
    seeds = iter(range(100, 200))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vector_store, "os", os_class(disk))
        mp.setattr(vector_store._Transaction, "__exit__", _recording_exit(disk, vector_store._Transaction.__exit__))
        store = VectorStore(folder, growth_rows=growth_rows, dtype=dtype)

        def upsert(ids: List[str], uris: Optional[Dict[str, str]] = None):
            nonlocal state
            uris = {i: (uris or {}).get(i, f"mem://{i}") for i in ids}
            vectors = _vectors(ids, next(seeds))
            rows = _stored(vectors, dtype)
            new = {i: v for i, v in state.items() if v[0] not in set(uris.values()) or i in uris}
            new.update({i: (uris[i], rows[k]) for k, i in enumerate(ids)})
            disk.op, disk.next_expected = f"upsert of {', '.join(ids)}", new
            store.upsert(vectors, [Record(id=i, uri=uris[i], tags={"n": k}) for k, i in enumerate(ids)], model="m")
            state = new

        def delete(ids: List[str]):
            nonlocal state
            new = {i: v for i, v in state.items() if i not in ids}
            disk.op, disk.next_expected = f"delete of {', '.join(ids)}", new
            assert store.delete(ids) == len(ids)
            state = new

        upsert([f"a{k}" for k in range(5)])
        upsert(["a1", "a3", "b0", "b1", "b2", "b3", "b4"], uris={"b4": "mem://a2"})  # b4 takes a2's picture
        delete(["a0", "b1"])
        disk.op, disk.next_expected = "reopen", state
        store.close()
        store = VectorStore(folder, growth_rows=growth_rows)
        upsert(["c0", "c1", "c2"])
        disk.op, disk.next_expected = "clear", {}
        store.clear()
        state = {}
        upsert([f"d{k}" for k in range(6)])
        delete(["d2"])
        upsert(["d0", "e0", "e1"])
        disk.op = "after the last write"
        disk.cut("the end", after=True)
        store.close()
    return disk


# ---- the checks --------------------------------------------------------------------------
def check_state(folder: str, expected: Expected, rng: np.random.Generator) -> None:
    """Open ``folder`` as an index and check it holds exactly ``expected``; AssertionError says what broke."""
    try:
        store = VectorStore(folder)
    except Exception as e:  # a state that will not open is the worst inconsistency
        raise AssertionError(f"VectorStore(path) raised {type(e).__name__}: {e}") from e
    try:
        assert store.count == len(expected), f"count is {store.count}, {len(expected)} committed"
        ids = sorted(r.id for _, r in store.iter_records())
        assert ids == sorted(expected), f"ids {ids}, committed {sorted(expected)}"
        records = store.get(ids)
        for i in ids:
            assert records[i].uri == expected[i][0], f"{i}: uri {records[i].uri!r}, committed {expected[i][0]!r}"
        got = store.vectors(ids)
        for i in ids:
            assert i in got, f"no vector for committed id {i}"
            wrong = int((got[i] != expected[i][1]).sum())
            assert not wrong, f"vector of committed id {i} is not the one written ({wrong} of {DIM} values differ)"
        queries = rng.standard_normal((3, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for q, hits in zip(queries, store.search(queries, limit=len(expected) + 3)):
            found = [r.id for r, _ in hits]
            assert sorted(found) == ids, f"search found {sorted(found)}, committed {ids}"
            scores = np.array([s for _, s in hits])
            want = np.array([float(expected[i][1] @ q) for i in found])
            assert np.allclose(scores, want, atol=1e-5), f"scores {scores} for {found}, want {want}"
            assert (np.diff(scores) <= 1e-6).all(), "search results are not best first"
        # and it goes on: a write after the crash commits and reads back, the committed rows untouched
        vector = rng.standard_normal((1, DIM)).astype(np.float32)
        store.upsert(vector, [Record(id="after-the-crash", uri="mem://after-the-crash")], model="m")
        assert store.count == len(expected) + 1
        got = store.vectors(ids + ["after-the-crash"])
        assert np.array_equal(got["after-the-crash"], _stored(vector, store.dtype)[0]), "a write after the crash reads back wrong"
        for i in ids:
            assert np.array_equal(got[i], expected[i][1]), f"a write after the crash changed the vector of {i}"
    finally:
        store.close()


def check_power_loss(tmp_path, dtype: str, names_model: str, os_class: type = RecordingOs) -> Tuple[dict, List[str]]:
    """Record the workload, check every distinct crash state; (figures, failures)."""
    disk = record_workload(str(tmp_path / "live"), dtype, names_model, os_class)
    rng = np.random.default_rng(20240501)
    seen, failures = set(), []
    figures = {"cuts": len(disk.cuts), "states": 0, "with unsynced bytes": 0, **disk.counts}
    for cut in disk.cuts:
        for variant, files in disk.states(cut, rng):
            key = (cut.sqlite_commit, tuple(sorted((n, hashlib.sha1(b).hexdigest()) for n, b in files.items())))
            if key in seen:
                continue
            seen.add(key)
            figures["states"] += 1
            durable = {n: cut.files[cut.names[n]][0] for n in files if n in cut.names}
            if any(durable.get(n) != b for n, b in files.items()):
                figures["with unsynced bytes"] += 1  # holds a part of an unsynced change
            folder = tmp_path / f"state{figures['states']}"
            folder.mkdir()
            for name, data in {**cut.sqlite, **files}.items():
                (folder / name).write_bytes(data)
            try:
                check_state(str(folder), cut.expected, rng)
            except AssertionError as e:
                failures.append(f"power cut {cut.label}, disk state '{variant}' "
                                f"(SQLite commit {cut.sqlite_commit}, {len(cut.expected)} ids): {str(e).splitlines()[0]}")
            shutil.rmtree(folder)
    return figures, failures


def _report(key: str, figures: dict, failures: List[str]) -> None:
    POWER_LOSS_FIGURES[key] = {**figures, "inconsistent": len(failures)}
    print(f"\npower loss {key}: {POWER_LOSS_FIGURES[key]}")


def _summary(failures: List[str], figures: dict) -> str:
    return (f"{len(failures)} of {figures['states']} power-loss states do not open as the index committed:\n  "
            + "\n  ".join(failures[:5]))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_power_loss_state_opens_as_the_committed_index(tmp_path, dtype):
    figures, failures = check_power_loss(tmp_path, dtype, "journal")
    _report(f"{dtype}/journal", figures, failures)
    # the recording saw the store at work: writes, syncs, commits, and states holding unsynced (torn) bytes
    assert figures["writes"] >= 6 and figures["syncs"] >= 5 and figures["commits"] >= 8, figures
    assert figures["with unsynced bytes"] >= 20, figures
    assert not failures, _summary(failures, figures)


def test_power_loss_with_names_only_as_durable_as_posix_promises(tmp_path):
    figures, failures = check_power_loss(tmp_path, "float32", "posix")
    _report("float32/posix", figures, failures)
    assert not failures, _summary(failures, figures)


class _SkipsVectorSync(RecordingOs):
    """A store that commits its rows without first syncing the vectors they point at."""

    def fdatasync(self, fd):
        pass


def test_the_check_catches_rows_committed_before_their_vectors_are_synced(tmp_path):
    figures, failures = check_power_loss(tmp_path, "float32", "journal", _SkipsVectorSync)
    _report("float32/journal, vectors never synced", figures, failures)
    assert failures, "a store that never syncs its vectors passed every power-loss state"
    assert any("not the one written" in f for f in failures) and any("damaged" in f for f in failures), failures[:5]
