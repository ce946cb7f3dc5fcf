"""What the CLI prints: the search table, `index --watch` batches, and an interrupted index (fake clients, no flows)."""

import re

import pytest

from clipseek import cli
from clipseek.client import IndexReport
from executors.docs import Hit


class FakeClient:
    def __init__(self, hits=(), index=None):
        self.hits, self._index = list(hits), index

    def search(self, *args, **kwargs):
        return self.hits

    def index(self, sources, **kwargs):
        return self._index(sources, **kwargs) if self._index else IndexReport()


def _run(monkeypatch, capsys, client, argv):
    monkeypatch.setattr(cli, "_client", lambda args: client)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_search_table_keeps_its_columns_with_negative_scores(monkeypatch, capsys):
    hits = [Hit(id="a1", uri="/p/best.jpg", score=0.5123), Hit(id="b2", uri="/p/zero.jpg", score=0.0),
            Hit(id="c3", uri="/p/worse.jpg", score=-0.25), Hit(id="d4", uri="/p/worst.jpg", score=-1.0)]
    code, out, _ = _run(monkeypatch, capsys, FakeClient(hits), ["search", "a cat"])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    assert len({line.index("/p/") for line in lines}) == 1, lines  # the paths start in one column
    scores = [float(re.split(r"\s+", line.strip())[1]) for line in lines]
    assert scores == [0.5123, 0.0, -0.25, -1.0]
    assert lines[0].split()[1] == "+0.5123" and lines[3].split()[1] == "-1.0000"


def test_an_interrupted_index_says_how_far_it_got(monkeypatch, capsys):
    def index(sources, progress, **kwargs):
        progress(2, 5)
        raise KeyboardInterrupt

    code, _, err = _run(monkeypatch, capsys, FakeClient(index=index), ["index", "pictures"])
    assert code == 130
    assert "interrupted after 2 of 5 images" in err


def test_watch_names_the_files_of_each_batch_and_the_totals_when_interrupted(monkeypatch, capsys, tmp_path):
    from clipseek import watch as watch_module

    paths = [f"/w/{n}.png" for n in range(7)]

    def fake_watch(client, folders, *, stop, on_changes, **options):
        on_changes(watch_module.WatchBatch(IndexReport(indexed=paths[:1])))
        on_changes(watch_module.WatchBatch(IndexReport(indexed=paths, failed=[("/w/bad.png", "cannot decode image")]),
                                           deleted=["/w/old.png", "/w/older.png"]))
        raise KeyboardInterrupt

    monkeypatch.setattr(watch_module, "watch", fake_watch)
    code, out, err = _run(monkeypatch, capsys, FakeClient(), ["index", str(tmp_path), "--watch"])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("indexed 0, unchanged 0")  # the first pass over the folder
    assert lines[1] == f"watching {tmp_path} (Ctrl-C stops)"
    assert lines[2:] == ["indexed 1: /w/0.png",
                         "indexed 7: /w/0.png, /w/1.png, /w/2.png and 4 more",
                         "failed: /w/bad.png: cannot decode image",
                         "deleted 2: /w/old.png, /w/older.png"]
    assert "interrupted: while watching, indexed 8 and deleted 2" in err
