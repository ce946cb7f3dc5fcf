"""The README's examples run as they are written.

Python blocks marked ``<!-- runs against a served flow -->`` run against one served flow (the tiny
model), with every picture and folder they name created first; the block marked ``<!-- runs offline
in the project folder -->`` runs in a process of its own, with the shipped model, from a folder laid
out like the project's. ``clipseek index --watch`` prints what the README says it prints.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from flows.serving import flows_in_subprocess, free_port
from flows.settings import PROJECT_ROOT, Settings

from tests.conftest import COLOURS, draw_picture

README = os.path.join(PROJECT_ROOT, "README.md")
SERVED = "<!-- runs against a served flow -->"
OFFLINE = "<!-- runs offline in the project folder -->"
DEFAULT_ADDRESSES = ("grpc://127.0.0.1:51000", "grpc://127.0.0.1:51001")  # (index, search) in the examples
IMAGE_NAME = re.compile(r"""["']([^"'\s]+\.(?:jpg|jpeg|png))["']""")
FOLDER_NAME = re.compile(r"""["'](~/[^"'\s]+)["']""")


def readme_blocks(marker: str):
    """The Python blocks that follow ``marker`` in the README."""
    text = open(README, encoding="utf-8").read()
    return re.findall(re.escape(marker) + r"\s*```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("workspace")))
    with flows_in_subprocess(settings):
        yield settings


def _make_named_pictures(code: str, home: str) -> None:
    """Every picture file the code names (relative to the working folder) and every ``~/`` folder (four pictures)."""
    colours = list(COLOURS)
    for n, name in enumerate(IMAGE_NAME.findall(code)):
        draw_picture(name, colours[n % len(colours)])
    for folder in FOLDER_NAME.findall(code):
        path = os.path.join(home, folder[2:])
        os.makedirs(path, exist_ok=True)
        for n, colour in enumerate(colours):
            draw_picture(os.path.join(path, f"{colour}.png"), colour, shape="circle" if n % 2 else "square")


def test_the_python_examples_run_against_a_served_flow(served, tmp_path, monkeypatch, capsys):
    blocks = readme_blocks(SERVED)
    assert len(blocks) >= 2, "the README marks its client examples"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))  # where the examples' ~/Pictures is
    monkeypatch.chdir(work)
    monkeypatch.setenv("CLIPSEEK_HOST", "127.0.0.1")  # ClipseekClient() finds the flows as `clipseek serve` set them
    monkeypatch.setenv("CLIPSEEK_INDEX_PORT", str(served.index_port))
    monkeypatch.setenv("CLIPSEEK_SEARCH_PORT", str(served.search_port))
    for n, code in enumerate(blocks):
        # the examples name the default ports; this flow listens on free ones
        code = code.replace(DEFAULT_ADDRESSES[0], served.index_address).replace(DEFAULT_ADDRESSES[1], served.search_address)
        _make_named_pictures(code, str(home))
        try:
            exec(compile(code, f"README.md python block {n + 1} ({SERVED})", "exec"), {"__name__": "__readme__"})
        except Exception as e:  # noqa: BLE001 - the block and its error, as a reader would meet them
            pytest.fail(f"README block {n + 1} fails: {type(e).__name__}: {e}\n{code}")
    out = capsys.readouterr().out
    assert "4 []" in out  # the client example indexed ~/Pictures, nothing failed
    assert re.search(r"^[+-]\d\.\d{3} .*Pictures/\w+\.png$", out, flags=re.M)  # its hits
    assert str(work / "cat.jpg") in out  # jina's own Client indexed and found cat.jpg


def _project_like_folder(tmp_path) -> str:
    """A folder laid out like the project (its code and the shipped model linked), whose flow YAMLs
    listen on free ports instead of 51000 / 51001."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("executors", "data", "clipseek", "flows"):
        os.symlink(os.path.join(PROJECT_ROOT, name), folder / name)
    for name, port in (("flow_index.yml", 51000), ("flow_search.yml", 51001)):
        text = open(os.path.join(PROJECT_ROOT, name), encoding="utf-8").read()
        assert f"port: {port}\n" in text
        (folder / name).write_text(text.replace(f"port: {port}\n", f"port: {free_port()}\n"), encoding="utf-8")
    return str(folder)


def test_the_in_process_flow_example_runs_offline_as_written(tmp_path):
    [code] = readme_blocks(OFFLINE)
    folder = _project_like_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEEK_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=PROJECT_ROOT, CLIPSEEK_WORKSPACE=str(tmp_path / "not-used"))
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    records = [json.loads(line) for line in open(os.path.join(folder, "workspace", "pictures", "captions.jsonl"))]
    assert last.startswith(records[0]["caption"])
    assert f"[('{records[0]['file']}', " in last  # its own picture first
    # the index is where the README says: the YAML's workspace under the folder it ran from
    assert os.path.exists(os.path.join(folder, "workspace", "SimpleIndexer", "0", "vectors.f32"))
    assert not os.path.exists(tmp_path / "not-used")


def _lines(stream, into: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        into.put(line.rstrip("\n"))


def _wait_for(lines: queue.Queue, seen: list, pattern: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    for line in seen:
        if re.search(pattern, line):
            return line
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in {seen}")


def test_watch_names_what_it_indexed_and_deleted(served, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    watched = tmp_path / "watched"
    os.symlink(real, watched)  # a folder reached through a link: deletions still find what was indexed
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clipseek.cli", "index", str(watched), "--watch",
           "--index-port", str(served.index_port), "--search-port", str(served.search_port)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, seen = queue.Queue(), []
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        _wait_for(lines, seen, r"^watching ")
        time.sleep(0.5)
        names = [f"{n}-{colour}.png" for n, colour in enumerate(["red", "green", "blue", "yellow", "red"])]
        for name in names:
            draw_picture(watched / name, name.split("-")[1].split(".")[0])
        line = _wait_for(lines, seen, r"^indexed \d+: ")
        assert line == (f"indexed 5: {real / names[0]}, {real / names[1]}, {real / names[2]} and 2 more"), seen
        os.remove(watched / names[0])
        line = _wait_for(lines, seen, r"^deleted ")
        assert line == f"deleted 1: {real / names[0]}", seen
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        _wait_for(lines, seen, r"^interrupted: while watching, indexed 5 and deleted 1$")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
