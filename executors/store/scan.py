"""The scan kernel: exact top-k inner products over a memory-mapped matrix of unit vectors.

Pure array work, no bookkeeping: the store (``vector_store.py``) decides which rows are live and
maps rows back to documents. One query is a matrix-vector product per chunk (memory-bound: the
speed of reading the rows); several queries are one matrix product per chunk. float16 rows are
multiplied by torch as stored and their few candidates re-ranked with exact float32 products.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

# A float16 scan by torch keeps this many extra candidates per chunk and re-ranks them all with
# float32 products, so that float16 rounding of the scores never reorders the top-k.
RESCORE_MARGIN = 32
# A numpy scan with a pool gives each thread at least this many rows: below it a split measured no faster
# (10,000 rows in two halves: 0.87-1.10x the time of one chunk), above it the threads share the reading
# (40,000 rows: 0.58x; 100,000 rows in two halves instead of 65,536 + 34,464: 0.79x).
MIN_SPLIT_ROWS = 16384
# Rows per chunk of a float16 scan.
F16_CHUNK_ROWS = 65536


def top_k(view: np.ndarray, mask: np.ndarray, queries: np.ndarray, limit: int, min_score: Optional[float], *,
          scan: str = "auto", chunk_rows: int = 65536, f16_chunk_rows: int = F16_CHUNK_ROWS,
          pool: Optional[Callable[[], Any]] = None, threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``limit`` rows of ``view`` (rows x dim, float32 or float16) by inner product with each
    query, over the rows where ``mask`` is true: (scores, rows) of shape (queries, limit), row -1 where
    fewer rows qualify. ``pool`` gives a thread pool of ``threads`` threads that scans chunks side by side
    (numpy scans), in chunks of at most ``chunk_rows`` (``chunk_bounds``)."""
    m = len(queries)
    half = view.dtype == np.float16
    if scan == "auto":  # the faster one for this storage dtype (benchmarks/indexer_bench.py)
        scan = "torch" if half and _torch() is not None else "numpy"
    torch = _torch() if scan == "torch" else None
    if torch is None and scan == "torch":
        raise ValueError("scan='torch' needs torch installed")
    # One query: a matrix-vector product (gemv), the fastest pass over a memory-bound chunk.
    q = np.ascontiguousarray(queries[0]) if m == 1 else np.ascontiguousarray(queries.T)
    chunk_rows = f16_chunk_rows if half else chunk_rows
    rescore = half and torch is not None  # float16 scores pick candidates; float32 ones rank them
    if torch is not None:
        # float16 rows are multiplied as they are stored (float32 accumulation, float16 scores)
        q = torch.from_numpy(q.astype(np.float16) if half else q)
    k_extra = RESCORE_MARGIN if rescore else 0

    def scan_chunk(bounds: Tuple[int, int]):
        start, stop = bounds
        block_mask = mask[start:stop]
        if not block_mask.any():
            return None
        block = np.asarray(view[start:stop])
        if torch is not None:
            block = _tensor(torch, block)
            scores = (torch.mv(block, q) if m == 1 else block @ q).float().numpy()
        else:
            if half:  # numpy has no fast float16 product: widen the chunk into float32 first
                block = block.astype(np.float32)
            scores = block @ q  # (rows,) for one query, else (rows, m)
        if m == 1:
            scores = scores[:, None]
        if not block_mask.all():
            scores[~block_mask] = -np.inf
        k = min(limit + k_extra, stop - start)
        part = np.argpartition(-scores, k - 1, axis=0)[:k] if k < stop - start else np.arange(stop - start)[:, None].repeat(m, 1)
        return np.take_along_axis(scores, part, axis=0), part + start

    # The pool's threads share a numpy scan's chunks; torch spreads each product over its own threads.
    chunks = chunk_bounds(len(view), chunk_rows, threads if pool is not None and torch is None else 1)
    if torch is not None:
        parts = [scan_chunk(bounds) for bounds in chunks]
    else:
        # Chunks side by side on the store's own threads, each product on one BLAS thread: as fast as
        # BLAS's threads on a memory-bound scan, and idle threads sleep instead of spinning, so the
        # CPU goes back to the other processes of the flow (the text encoder) as soon as a scan ends.
        with single_threaded_blas():
            if len(chunks) > 1 and pool is not None:
                parts = list(pool().map(scan_chunk, chunks))
            else:
                parts = [scan_chunk(bounds) for bounds in chunks]
    parts = [p for p in parts if p is not None]
    cand_scores = [p[0] for p in parts]
    cand_rows = [p[1] for p in parts]
    if not cand_scores:
        return np.full((m, 0), -np.inf, dtype=np.float32), np.full((m, 0), -1, dtype=np.int64)
    all_scores = np.concatenate(cand_scores, axis=0).T  # (m, candidates)
    all_rows = np.concatenate(cand_rows, axis=0).T
    if rescore:  # exact float32 products of the few candidate rows, as the widening scan computes them
        for i in range(m):
            kept = np.isfinite(all_scores[i])
            rows_i = all_rows[i][kept]
            all_scores[i][kept] = np.asarray(view[rows_i], dtype=np.float32) @ queries[i]
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :limit]
    top_scores = np.take_along_axis(all_scores, order, axis=1)
    top_rows = np.take_along_axis(all_rows, order, axis=1)
    floor = -np.inf if min_score is None else float(min_score)
    top_rows = np.where((top_scores > -np.inf) & (top_scores >= floor), top_rows, -1)
    return top_scores, top_rows


def chunk_bounds(rows: int, chunk_rows: int, threads: int = 1) -> List[Tuple[int, int]]:
    """(start, stop) of each chunk of a scan of ``rows`` rows, none over ``chunk_rows``. One thread: chunks of
    ``chunk_rows``, the last one short. Several: as many chunks as that needs, rounded up to a multiple of
    ``threads`` (no thread scans a last chunk alone), or where that is fewer chunks than threads, one per
    thread as long as each keeps ``MIN_SPLIT_ROWS`` rows; their lengths differ by a row at most."""
    if threads <= 1 or rows <= 0:
        return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]
    needed = -(-rows // chunk_rows)
    if needed >= threads:
        count = -(-needed // threads) * threads
    else:
        count = max(needed, min(threads, rows // MIN_SPLIT_ROWS))
    edges = [rows * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


_TORCH: Any = None
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT: Any = None
_BLAS_CONTROLLER: Any = None


def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, found once (None without threadpoolctl)."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # without it BLAS keeps its own threads
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER or None


class single_threaded_blas:
    """numpy's BLAS on one thread while any scan runs (re-entrant, safe across threads).

    A multi-threaded OpenBLAS keeps its idle worker threads spinning for a while after each call;
    in a flow whose processes share a few cores, those spinning threads take CPU from the next
    request's text encoder. The store parallelises over chunks itself instead.
    """

    def __enter__(self):
        global _BLAS_USERS, _BLAS_LIMIT
        with _BLAS_LOCK:
            _BLAS_USERS += 1
            if _BLAS_USERS == 1:
                controller = _blas_controller()
                _BLAS_LIMIT = controller.limit(limits=1, user_api="blas") if controller is not None else None
        return self

    def __exit__(self, *exc):
        global _BLAS_USERS, _BLAS_LIMIT
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0 and _BLAS_LIMIT is not None:
                _BLAS_LIMIT.restore_original_limits()
                _BLAS_LIMIT = None
        return False


def _torch():
    """The torch module, or None where it is not installed (the store then scans with numpy alone)."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
        except ImportError:
            _TORCH = False
        else:
            _TORCH = torch
    return _TORCH or None


def _tensor(torch, array: np.ndarray):
    """A tensor sharing the memory of a (read-only, memory-mapped) array; it is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
