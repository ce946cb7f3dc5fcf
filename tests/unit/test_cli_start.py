"""The commands that only talk to the servers start without torch: `clipseek search` answers in about a
second, not three (docarray imports torch whenever it is installed, unless it finds it missing)."""

import os
import subprocess
import sys

import pytest

from clipseek.cli import CLIENT_COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imported(*args) -> set:
    """The modules `python -m clipseek.cli ARGS` imported (a closed port: the request fails fast); a module
    looked up and refused (torch, where it is kept out) has a line of its own too, but no submodules."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "clipseek.cli", *args, "--index-port", "1",
                          "--search-port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CLIPSEEK_LOG": os.devnull})
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    names = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert {"docarray", "jina", "grpc"} <= names, "the command never reached its request"
    return names


@pytest.mark.parametrize("args", [["status"], ["search", "a black cat"], ["-v", "duplicates"]])
def test_a_client_command_starts_without_torch(args):
    torch = sorted(name for name in _imported(*args) if name.startswith("torch."))
    assert not torch, torch[:5]


def test_the_commands_without_torch_are_the_client_ones():
    assert CLIENT_COMMANDS == {"index", "search", "status", "delete", "clear", "classify", "duplicates"}


@pytest.mark.parametrize("command", ["serve", "snapshot"])
def test_a_command_that_runs_models_or_reads_the_index_keeps_torch(command):
    """`serve`, `demo` and `train-demo-model` run models, `snapshot` reads the index files itself, `export`
    loads the flows: the process of each can still import torch after the command has run."""
    check = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['clipseek', {command!r}, '--help']\n"
                            "import clipseek.cli as c\ntry:\n    c.console()\nexcept SystemExit:\n    pass\n"
                            "import torch; print('torch', torch.__version__)"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert check.stdout.strip().splitlines()[-1].startswith("torch "), check.stderr[-2000:]


def test_a_client_command_of_an_in_process_main_leaves_torch_alone():
    """``main`` (called in a process that may want torch later: a notebook, these tests) never keeps it out."""
    check = subprocess.run([sys.executable, "-c", "import clipseek.cli as c\n"
                            "c.main(['status', '--index-port', '1', '--search-port', '1'])\n"
                            "import torch; print('torch', torch.__version__)"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert check.stdout.strip().splitlines()[-1].startswith("torch "), check.stderr[-2000:]
