"""Incremental sync: skip unchanged, re-embed changed, prune what is gone, and watch folders."""

import os
import threading
import time

import pytest

from executors.images.imaging import uri_id
from clipseek.client import ClipseekClient
from flows.serving import flows_in_subprocess, free_port
from flows.settings import Settings
from clipseek.watch import watch

from tests.conftest import draw_picture


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("ws")))
    with flows_in_subprocess(settings):
        yield ClipseekClient(settings.index_address, settings.search_address)


def test_prune_and_list(served, tmp_path):
    client = served
    client.clear()
    folder = tmp_path / "album"
    folder.mkdir()
    paths = [draw_picture(folder / f"{c}.png", c) for c in ("red", "green", "blue")]
    other = draw_picture(tmp_path / "elsewhere.png", "yellow")
    client.index([str(folder), other])
    assert sorted(d.uri for d in client.documents(page=2)) == sorted(paths + [other])  # paging over pages of 2
    os.remove(paths[0])
    os.remove(other)  # gone too, but not under the pruned folder
    assert client.prune([str(folder)]) == [paths[0]]
    assert sorted(d.uri for d in client.documents()) == sorted(paths[1:] + [other])
    # content hash decides when only mtime changed
    os.utime(paths[1], (time.time() + 100, time.time() + 100))
    assert client.index([paths[1]]).unchanged == [paths[1]]


def test_watch_indexes_new_changed_and_removed_files(served, tmp_path):
    client = served
    client.clear()
    folder = tmp_path / "watched"
    folder.mkdir()
    stop, batches = threading.Event(), []
    thread = threading.Thread(target=watch, args=(client, [str(folder)]),
                              kwargs=dict(stop=stop, quiet=0.3, on_batch=lambda r, d: batches.append((r, d))))
    thread.start()
    try:
        time.sleep(0.5)
        new = draw_picture(folder / "new.png", "red")
        (folder / "notes.txt").write_text("ignored")
        _wait(lambda: client.lookup([uri_id(new)])[0].found)
        os.remove(new)
        _wait(lambda: not client.lookup([uri_id(new)])[0].found)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert any(new in r.indexed for r, _ in batches) and any(d == 1 for _, d in batches)


def _wait(condition, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
