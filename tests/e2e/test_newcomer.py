"""What a newcomer meets in the first hour: each command does what it says, or says clearly why not."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from executors.store.vector_store import Record, VectorStore
from flows.serving import free_port
from flows.settings import DEMO_MODEL_DIR

from .test_cli import CLI, ROOT, Server, _env, _run


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ws")
    env = _env(tiny_model, workspace, (free_port(), free_port()))
    server = Server(env)
    try:
        yield env, workspace
    finally:
        server.stop()


def test_tags_given_for_unchanged_pictures_are_applied(served, picture_dir):
    env, _ = served
    root, paths = picture_dir
    assert _run(["clear", "--yes"], env).returncode == 0
    first = _run(["index", str(root)], env)
    assert "indexed 4, unchanged 0 (skipped), failed 0" in first.stdout, first.stdout + first.stderr
    again = _run(["index", str(root), "--tag", "album=pets"], env)
    assert "indexed 0, unchanged 4 (skipped (4 given the new tags)), failed 0" in again.stdout, again.stdout
    found = _run(["search", "a red circle", "--filter", '{"album": "pets"}', "--json"], env)
    hits = json.loads(found.stdout)
    assert sorted(h["uri"] for h in hits) == sorted(paths) and all(h["tags"] == {"album": "pets"} for h in hits)


def test_usage_errors_exit_2_with_one_line(served, tmp_path):
    env, _ = served
    bad_tag = _run(["index", str(tmp_path), "--tag", "album"], env)
    assert bad_tag.returncode == 2 and "--tag: wants KEY=VALUE, got 'album'" in bad_tag.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    named = _run(["index", str(notes)], env)
    assert named.returncode == 1 and f"failed: {notes}: not a picture or video file (clipseek reads .jpg" in named.stdout
    assert "pydantic" not in named.stdout + named.stderr


def test_an_empty_index_says_so(served):
    env, _ = served
    assert _run(["clear", "--yes"], env).returncode == 0
    for command in (["search", "a cat"], ["status"]):
        out = _run(command, env)
        assert out.returncode == 0 and "the index is empty: add pictures with `clipseek index DIR`" in out.stdout


def test_a_closed_pipe_ends_a_command_quietly(served):
    env, _ = served
    proc = subprocess.Popen(CLI + ["status", "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written, as after `| head -1`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Broken pipe" not in err and "error" not in err, err


def test_a_locked_index_is_named_without_an_exception_repr(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    holder = VectorStore(str(workspace / "SimpleIndexer" / "0"))  # another process writes this index
    holder.upsert(np.ones((1, 32), dtype=np.float32), [Record(id="x", uri="/x.png")], model="tiny-clip")
    env = _env(tiny_model, workspace, (free_port(), free_port()))
    server = Server(env)
    try:
        for command in (["clear", "--yes"], ["delete", "/x.png"]):
            out = _run(command, env)
            assert out.returncode == 2, out.stdout + out.stderr
            assert f"is open for writing by another process (pid {os.getpid()})" in out.stderr, out.stderr
            assert "StoreLockedError(" not in out.stderr
    finally:
        server.stop()
        holder.close()


def test_serve_refuses_a_workspace_of_another_model(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    store = VectorStore(str(workspace / "SimpleIndexer" / "0"))
    store.upsert(np.ones((1, 32), dtype=np.float32), [Record(id="x", uri="/x.png")], model="tiny-clip")
    store.close()
    env = {**_env(tiny_model, workspace, (free_port(), free_port())), "CLIPSEEK_MODEL": DEMO_MODEL_DIR}
    out = subprocess.run(CLI + ["serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "holds embeddings of model 'tiny-clip'; these flows would load 'clipseek-demo'" in out.stderr, out.stderr


def test_a_model_path_that_does_not_exist_is_no_such_folder(tmp_path):
    env = _env(DEMO_MODEL_DIR, tmp_path / "ws", (free_port(), free_port()))
    out = subprocess.run(CLI + ["serve", "--model", "./no_such_dir"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "cannot load model './no_such_dir': no such folder" in out.stderr, out.stderr
    assert "Repo id" not in out.stderr and "huggingface-cli" not in out.stderr


def test_snapshot_create_refuses_to_overwrite_without_force(tmp_path):
    workspace = tmp_path / "ws"
    store = VectorStore(str(workspace / "SimpleIndexer" / "0"))
    store.upsert(np.ones((1, 8), dtype=np.float32), [Record(id="x", uri="/x.png")], model="m")
    store.close()
    env = {**os.environ, "CLIPSEEK_WORKSPACE": str(workspace)}
    target = tmp_path / "backup.zip"
    target.write_bytes(b"precious")
    run = lambda *extra: subprocess.run([sys.executable, "-m", "clipseek.cli", "snapshot", "create", str(target), *extra],  # noqa: E731
                                        capture_output=True, text=True, env=env, cwd=ROOT)
    refused = run()
    assert refused.returncode == 2 and "exists; pass --force to replace it" in refused.stderr
    assert target.read_bytes() == b"precious"
    assert run("--force").returncode == 0 and target.read_bytes() != b"precious"


def test_search_by_when_the_picture_was_taken(served, tmp_path):
    from tests.unit.test_when_and_where import exif_jpeg

    env, _ = served
    assert _run(["clear", "--yes"], env).returncode == 0
    folder = tmp_path / "trip"
    folder.mkdir()
    for name, taken, colour in (("winter", "2019:01:10 09:00:00", (20, 20, 220)), ("summer", "2019:07:04 10:00:00", (220, 20, 20)),
                                ("late-summer", "2019:08:31 23:00:00", (200, 40, 40)), ("autumn", "2019:10:01 12:00:00", (230, 30, 30))):
        exif_jpeg(folder / f"{name}.jpg", original=taken, colour=colour)
    assert "indexed 4," in _run(["index", str(folder)], env).stdout
    summer = json.loads(_run(["search", "a red picture", "--after", "2019-06-01", "--before", "2019-09-01", "--json"], env).stdout)
    assert sorted(os.path.basename(h["uri"]) for h in summer) == ["late-summer.jpg", "summer.jpg"]
    assert {h["taken"] for h in summer} == {"2019-07-04T10:00:00+00:00", "2019-08-31T23:00:00+00:00"}
    assert {h["taken_from"] for h in summer} == {"DateTimeOriginal"} and {h["camera"] for h in summer} == {"Canon EOS R5"}
    newest = json.loads(_run(["search", "a red picture", "--limit", "3", "--sort", "date", "--json"], env).stdout)
    by_score = json.loads(_run(["search", "a red picture", "--limit", "3", "--json"], env).stdout)
    assert {h["id"] for h in newest} == {h["id"] for h in by_score}  # the same best 3 by score ...
    assert [h["taken"] for h in newest] == sorted((h["taken"] for h in newest), reverse=True)  # ... newest first
    bad = _run(["search", "a red picture", "--after", "last summer"], env)
    assert bad.returncode == 2 and "neither epoch seconds nor an ISO date" in bad.stderr
