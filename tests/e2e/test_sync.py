"""Incremental sync: skip unchanged, re-embed changed, prune what is gone, and watch folders."""

import os
import threading
import time

import pytest

from executors.images.imaging import content_hash, uri_id
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
    # what new.png will hold once changed, kept outside the watched folder to query by example
    probe = draw_picture(tmp_path / "probe.png", "blue", shape="square")
    stop, batches = threading.Event(), []
    thread = threading.Thread(target=watch, args=(client, [str(folder)]),
                              kwargs=dict(stop=stop, quiet=0.3, on_batch=lambda r, d: batches.append((r, d))))
    thread.start()
    try:
        time.sleep(0.5)
        new = draw_picture(folder / "new.png", "red")
        kept = draw_picture(folder / "kept.png", "green", shape="square")
        (folder / "notes.txt").write_text("ignored")
        _wait(lambda: all(d.found for d in client.lookup([uri_id(new), uri_id(kept)])))
        first = client.lookup([uri_id(new)])[0]
        assert first.content_hash == content_hash(open(new, "rb").read())
        [before] = [h.score for h in client.search(image=probe, limit=2) if h.uri == new]

        draw_picture(folder / "new.png", "blue", shape="square")  # the same file, new content
        changed = content_hash(open(new, "rb").read())
        assert changed != first.content_hash
        _wait(lambda: client.lookup([uri_id(new)])[0].content_hash == changed)
        hits = client.search(image=probe, limit=2)
        print(f"new.png against its new content: {before:.4f} before the change, {hits[0].score:.4f} after")
        # the stored embedding is the new content's: the picture it now holds finds it first, as itself
        assert hits[0].uri == new and hits[0].score >= 0.999 > before, (before, [(h.uri, h.score) for h in hits])
        assert client.lookup([uri_id(kept)])[0].found and client.status().count == 2

        os.remove(new)
        _wait(lambda: not client.lookup([uri_id(new)])[0].found)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert sum(new in r.indexed for r, _ in batches) == 2  # created, then changed
    assert any(d == 1 for _, d in batches)
    assert [h.uri for h in client.search(image=probe, limit=5)] == [kept]


def _wait(condition, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
