"""Load: 16 client threads search while one client indexes, over loopback gRPC, for CLIPSEEK_LOAD_SECONDS
(default 20). Zero errors; every hit was indexed (or in flight); the count never goes down; search
answers are as full as the index allows; the serving processes' memory stays flat.

With -s it prints requests served, throughput and p50 / p99 latency (also kept in ``LOAD_FIGURES``).
"""

import os
import threading
import time

import numpy as np
import psutil
import pytest

from executors.images.imaging import uri_id
from clipseek.client import ClipseekClient
from flows.serving import flows_in_subprocess, free_port
from flows.settings import Settings

from tests.conftest import COLOURS, draw_picture

SEARCHERS = 16
QUERIES = ["a red circle", "a photo of a blue square", "green", "yellow circle", "a photo"]
LIMIT = 5
RSS_GROWTH_BOUND = 96 * 2**20  # bytes the serving processes may grow by, second half over first
LOAD_FIGURES = {}


def _serving_processes():
    return psutil.Process().children(recursive=True)


def _rss(processes) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


@pytest.fixture
def served(tiny_model, tmp_path):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path / "workspace"))
    with flows_in_subprocess(settings):
        yield settings


def test_searches_while_indexing(served, tmp_path):
    settings = served
    seconds = float(os.environ.get("CLIPSEEK_LOAD_SECONDS", "20"))
    pics = tmp_path / "pics"
    pics.mkdir()
    colours = list(COLOURS)

    lock = threading.Lock()
    submitted = set()  # ids sent to /index (a hit may show one as soon as it is committed)
    confirmed = set()  # ids the index flow answered as indexed
    errors = []
    latencies = []
    counts = []  # (time, count) seen by the indexer's status calls
    stop = threading.Event()

    def picture(i: int) -> str:
        return draw_picture(pics / f"p{i:05d}.png", colours[i % 4], size=(32 + i % 29, 32 + i % 23),
                            shape="circle" if i % 3 else "square")

    # a first few, so every search has something to find
    first = [picture(i) for i in range(8)]
    warm = ClipseekClient(settings.index_address, settings.search_address, timeout=60)
    report = warm.index(first)
    assert len(report.indexed) == 8, report.failed
    submitted.update(uri_id(p) for p in first)
    confirmed.update(uri_id(p) for p in first)

    def indexer():
        client = ClipseekClient(settings.index_address, settings.search_address, timeout=60)
        i = len(first)
        last_count = -1
        try:
            while not stop.is_set():
                batch = [picture(j) for j in range(i, i + 4)]
                i += 4
                with lock:
                    submitted.update(uri_id(p) for p in batch)
                result = client.index(batch)
                if result.failed or len(result.indexed) != len(batch):
                    errors.append(f"index: {result.failed}")
                with lock:
                    confirmed.update(uri_id(p) for p in result.indexed)
                    known, sent = len(confirmed), len(submitted)
                count = client.status().count
                counts.append((time.monotonic(), count))
                if count < last_count:
                    errors.append(f"count went down from {last_count} to {count}")
                if not known <= count <= sent:
                    errors.append(f"count {count} outside [{known} indexed, {sent} sent]")
                last_count = count
        except Exception as e:  # noqa: BLE001 - every failure is a test failure, reported below
            errors.append(f"indexer: {type(e).__name__}: {e}")

    def searcher(n: int):
        client = ClipseekClient(settings.index_address, settings.search_address, timeout=60)
        k = n
        try:
            while not stop.is_set():
                text = QUERIES[k % len(QUERIES)]
                k += 1
                with lock:
                    floor = len(confirmed)
                t0 = time.perf_counter()
                hits = client.search(text, limit=LIMIT)
                spent = time.perf_counter() - t0
                with lock:
                    sent = set(submitted)
                latencies.append(spent)
                unknown = [h.id for h in hits if h.id not in sent]
                if unknown:
                    errors.append(f"search {text!r}: hits never indexed: {unknown}")
                if len(hits) < min(LIMIT, floor):
                    errors.append(f"search {text!r}: {len(hits)} hits with {floor} indexed")
                if [h.score for h in hits] != sorted((h.score for h in hits), reverse=True):
                    errors.append(f"search {text!r}: hits not best first")
        except Exception as e:  # noqa: BLE001
            errors.append(f"searcher {n}: {type(e).__name__}: {e}")

    processes = _serving_processes()
    assert processes, "no serving processes found under the test process"
    samples = []  # (time, rss of the serving processes)
    threads = [threading.Thread(target=indexer, daemon=True)]
    threads += [threading.Thread(target=searcher, args=(n,), daemon=True) for n in range(SEARCHERS)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    while time.monotonic() - t_start < seconds and not errors:
        samples.append((time.monotonic() - t_start, _rss(processes)))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    elapsed = time.monotonic() - t_start

    assert not errors, errors[:10]
    served_requests = len(latencies)
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    final = ClipseekClient(settings.index_address, settings.search_address).status().count
    assert final == len(confirmed)
    half = [rss for t, rss in samples if t < seconds / 2], [rss for t, rss in samples if t >= seconds / 2]
    growth = np.mean(half[1]) - np.mean(half[0])
    LOAD_FIGURES.update(seconds=round(elapsed, 1), searches=served_requests, indexed=len(confirmed),
                        searches_per_s=round(served_requests / elapsed, 1), p50_ms=round(1000 * float(p50), 1),
                        p99_ms=round(1000 * float(p99), 1), rss_first_half_mb=round(float(np.mean(half[0])) / 2**20, 1),
                        rss_second_half_mb=round(float(np.mean(half[1])) / 2**20, 1), processes=len(processes))
    print(f"\nload: {LOAD_FIGURES}")
    assert served_requests >= SEARCHERS and len(confirmed) > len(first)
    assert counts and counts[-1][1] >= counts[0][1]
    assert growth < RSS_GROWTH_BOUND, f"serving processes grew by {growth / 2**20:.0f} MiB under load"
