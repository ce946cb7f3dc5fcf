"""Local reads end to end: a named pipe among the pictures of an indexed folder is named and skipped, by
``clipseek index`` against a local server (which reads the files itself) and by a client that sends the
bytes (as for a remote server), and the server refuses one posted to it directly, without blocking."""

import os
import subprocess
import sys

import pytest
from docarray import DocList

from clipseek.client import ClipseekClient
from executors.docs import ImageInput
from flows.serving import flows_in_subprocess, free_port
from flows.settings import PROJECT_ROOT, Settings

from tests.conftest import call_within

NOT_REGULAR = "is a named pipe (FIFO), not a regular file"


def _unblock(fifo) -> None:
    """Give a reader blocked on opening ``fifo`` its end of file (so a failed run does not hang teardown)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass


def _within(seconds, fn, *args, **kwargs):
    finished, result = call_within(seconds, fn, *args, **kwargs)
    assert finished, f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture
def served(tiny_model, tmp_path):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path / "ws"))
    with flows_in_subprocess(settings):
        yield settings


def test_a_named_pipe_in_an_indexed_folder(served, picture_dir):
    settings = served
    root, paths = picture_dir
    fifo = root / "sub" / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("CLIPSEEK_HOST", None)
        result = subprocess.run([sys.executable, "-m", "clipseek.cli", "index", str(root),
                                 "--index-port", str(settings.index_port), "--search-port", str(settings.search_port)],
                                cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "indexed 4, unchanged 0 (skipped), failed 1" in result.stdout, result.stdout
        assert f"  failed: {fifo}: {NOT_REGULAR}" in result.stdout, result.stdout

        # a client that sends the bytes (a remote server) does not open the pipe either
        client = ClipseekClient(settings.index_address, settings.search_address, send_bytes=True, timeout=60)
        report = _within(60, client.index, [str(root)], force=True)
        assert sorted(report.indexed) == paths and report.failed == [(str(fifo), NOT_REGULAR)]

        # the server itself refuses a pipe sent to it by path, at once
        docs = DocList[ImageInput]([ImageInput(id="pipe", uri=str(fifo), url=str(fifo))])
        [answer] = _within(60, client._post, client.index_address, "/index", docs, DocList[ImageInput])
        assert answer.status == "failed" and answer.error == f"{fifo}: {NOT_REGULAR}"
        assert client.status().count == 4
    finally:
        _unblock(fifo)
