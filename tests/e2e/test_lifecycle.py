"""A server's processes live and die with it: SIGKILL of `clipseek serve` ends its gateways and executors and
frees its ports; one server per workspace; a port in use is one line naming the flag that moves it."""

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flows.serving import LOCK_FILE, ORPHAN_GRACE_S, free_port

from .test_cli import CLI, ROOT, Server, _env, _run

LIFECYCLE_FIGURES = {}

# A process that ties what it forks to itself, forks a child that forks a grandchild, prints the three pids
# and waits to be killed. argv: "kernel" or "watch" (as where prctl is unavailable), "plain" or "stubborn"
# (the child ignores SIGTERM).
FAMILY = r"""
import multiprocessing, os, signal, sys, time
import flows.serving as serving

if sys.argv[1] == "watch":
    serving.set_parent_death_signal = lambda sig: False

def grandchild():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        time.sleep(1)

def child(out):
    if sys.argv[2] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g = multiprocessing.get_context("fork").Process(target=grandchild)
    g.start()
    out.send((os.getpid(), g.pid))
    while True:
        time.sleep(1)

with serving.children_die_with_this_process():
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    multiprocessing.get_context("fork").Process(target=child, args=(theirs,)).start()
    pids = ours.recv()
print("pids", os.getpid(), *pids, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _group(pgid: int) -> list:
    """Live processes of process group ``pgid`` (the serve process and everything it forked keep its group)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids, timeout: float) -> float:
    start = time.monotonic()
    while any(_alive(p) for p in pids):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"still alive after {timeout} s: {[p for p in pids if _alive(p)]}")
        time.sleep(0.05)
    return time.monotonic() - start


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve_once(args, env, timeout=60):
    """``clipseek serve ARGS`` expected to give up by itself: (return code, stdout, stderr, seconds taken);
    whatever it started is killed, whether it gave up or not."""
    start = time.monotonic()
    proc = subprocess.Popen(CLI + ["serve", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", "(still running)"
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return proc.returncode, out, err, time.monotonic() - start


def _family(*args):
    proc = subprocess.Popen([sys.executable, "-c", FAMILY, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline().split()
    if line[:1] != ["pids"]:
        _kill_group(proc.pid)
        raise AssertionError(proc.communicate()[1])
    return proc, [int(p) for p in line[1:]]


@pytest.mark.parametrize("how", ["kernel", "watch"])
def test_forked_processes_end_with_their_parent(how):
    proc, pids = _family(how, "plain")
    try:
        assert pids[0] == proc.pid and len(pids) == 3 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        took = _wait_gone(pids[1:], timeout=ORPHAN_GRACE_S)  # the watch polls every half second
        LIFECYCLE_FIGURES[f"forks_gone_s_{how}"] = round(took, 2)
    finally:
        _kill_group(proc.pid)


def test_an_orphan_that_ignores_sigterm_is_killed_after_the_grace():
    proc, (_, child, grandchild) = _family("kernel", "stubborn")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(1)
        assert _alive(child)  # SIGTERM ignored ...
        took = _wait_gone([child, grandchild], timeout=ORPHAN_GRACE_S + 5)
        assert took >= ORPHAN_GRACE_S - 1.5  # ... until the grace is over
    finally:
        _kill_group(proc.pid)


def test_a_process_whose_parent_is_already_gone_ends():
    code = "import os, time, flows.serving as s; s.die_with_parent(os.getppid() + 1_000_000); time.sleep(30)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == -signal.SIGTERM, out.stderr


@pytest.mark.parametrize("how", ["pidfd", "poll"])
def test_a_process_started_for_a_caller_not_its_parent_ends_with_that_caller(how):
    """A fork server's child: its parent (the server) lives on while its caller is killed."""
    caller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    code = ("import os, sys, time, flows.serving as s\n"
            "if sys.argv[2] == 'poll':\n    del os.pidfd_open\n"
            "s.die_with_caller(int(sys.argv[1])); print('watching', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(caller.pid), how], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert child.poll() is None  # the caller lives: so does it
        caller.kill()
        caller.wait(10)
        assert child.wait(ORPHAN_GRACE_S + 5) == -signal.SIGTERM
    finally:
        for proc in (caller, child):
            if proc.poll() is None:
                proc.kill()


def test_a_process_started_for_a_caller_already_gone_ends():
    code = "import os, time, flows.serving as s; s.die_with_caller(os.getppid() + 1_000_000); time.sleep(30)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == -signal.SIGTERM, out.stderr


def _write_environment(path, ready, stop, errors):
    with open(path, "w", encoding="utf-8") as f:
        f.write(os.environ.get("CLIPSEEK_TEST_MARK", "-"))
    ready.set()
    stop.wait()


def test_a_served_process_gets_its_callers_environment_as_it_is_when_started(tmp_path, monkeypatch):
    """The fork server behind ``served_in_subprocess`` starts once, with the environment of then."""
    from flows.serving import served_in_subprocess

    for mark in ("first", "second"):
        monkeypatch.setenv("CLIPSEEK_TEST_MARK", mark)
        with served_in_subprocess(_write_environment, "clipseek-env", 120, str(tmp_path / mark)):
            pass
        assert (tmp_path / mark).read_text() == mark


# A server that locks a workspace, forks a process that holds the lock on for argv[2] seconds, prints its pid
# and dies.
DEAD_OWNER = r"""
import os, sys, time
from flows.serving import workspace_lock
from flows.settings import Settings

with workspace_lock(Settings(workspace=sys.argv[1], index_port=1, search_port=2)):
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the server's output ends with it
        os.dup2(null, 2)
        time.sleep(float(sys.argv[2]))
        os._exit(0)
    print(pid, flush=True)
    os._exit(0)
"""


def _dead_owner(workspace, seconds: float, leftovers: list) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", DEAD_OWNER, str(workspace), str(seconds)], cwd=ROOT, timeout=30,
                         capture_output=True, text=True)
    leftovers.extend(int(p) for p in out.stdout.split())
    return out


def test_a_lock_left_by_a_dead_server_waits_for_its_last_process(tmp_path):
    from flows.serving import WorkspaceInUse, workspace_lock
    from flows.settings import Settings

    leftovers = []
    try:
        assert _dead_owner(tmp_path, 2, leftovers).returncode == 0
        start = time.monotonic()
        with workspace_lock(Settings(workspace=str(tmp_path), index_port=3, search_port=4)):
            took = time.monotonic() - start
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
            held = _dead_owner(tmp_path, 0, leftovers)
            assert held.returncode == 1 and f"served by clipseek serve pid {os.getpid()}" in held.stderr, held.stderr
            with workspace_lock(Settings(workspace=str(tmp_path))):  # the same process may enter it again
                pass
        assert 1.0 < took < 8, took
        assert _dead_owner(tmp_path, 3, leftovers).returncode == 0
        with pytest.raises(WorkspaceInUse, match="which is gone"):
            with workspace_lock(Settings(workspace=str(tmp_path)), wait=1):
                pass
        _wait_gone(leftovers, timeout=10)
    finally:
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigkill_of_serve_ends_its_flows_and_a_restart_works(tiny_model, tmp_path):
    ports = (free_port(), free_port())
    env = _env(tiny_model, tmp_path / "ws", ports)
    server = Server(env)
    pgid = server.proc.pid
    try:
        tree = _group(pgid)
        assert len(tree) >= 7, tree  # the serve process, and the gateways and executors jina forked from it
        os.kill(server.proc.pid, signal.SIGKILL)  # the serve process alone, not its group
        killed = time.monotonic()
        server.proc.wait(10)
        _wait_gone(tree, timeout=10)
        took = time.monotonic() - killed
        assert all(_port_free(p) for p in ports), ports
        LIFECYCLE_FIGURES["flows_gone_after_sigkill_s"] = round(took, 2)
        print(f"\n{len(tree) - 1} flow processes gone {took:.2f} s after SIGKILL of clipseek serve")
    finally:
        server.stop()
        _kill_group(pgid)
    # the lock file still names the killed server: it blocks nobody
    assert json.loads((tmp_path / "ws" / LOCK_FILE).read_text())["pid"] == pgid
    server = Server(env)  # the same ports, the same workspace
    try:
        status = _run(["status", "--json"], env, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["count"] == 0, status.stdout + status.stderr
        # the precision auto picked for each tower, and why, is in the workspace's log without -v
        log = (tmp_path / "ws" / "clipseek.log").read_text(errors="replace")
        assert re.search(r"loaded clip model \S+ on cpu in (float32|bfloat16|int8) \(auto on cpu", log), log[-2000:]
    finally:
        assert server.stop() == 0
        _kill_group(server.proc.pid)


def test_a_second_serve_on_the_same_workspace_is_refused(tiny_model, tmp_path):
    ports = (free_port(), free_port())
    env = _env(tiny_model, tmp_path / "ws", ports)
    server = Server(env)
    try:
        other = dict(env, CLIPSEEK_INDEX_PORT=str(free_port()), CLIPSEEK_SEARCH_PORT=str(free_port()))
        code, out, err, took = _serve_once([], other)
        assert code == 2, out + err
        error = err.strip()
        assert len(error.splitlines()) == 1 and "Traceback" not in error, error
        assert f"pid {server.proc.pid}" in error and f"index port {ports[0]}" in error, error
        assert f"search port {ports[1]}" in error and str(tmp_path / "ws") in error, error
        assert took < 20, took  # refused before any flow is built
        assert _run(["status"], env, timeout=60).returncode == 0  # the first one serves on
    finally:
        assert server.stop() == 0
        _kill_group(server.proc.pid)


@pytest.mark.parametrize("flag", ["--index-port", "--search-port", "--web-port"])
def test_a_port_in_use_is_one_line_naming_its_flag(tiny_model, tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(tiny_model, tmp_path / "ws", (free_port(), free_port()))
        args = [flag, str(port)] + (["--web"] if flag == "--web-port" else [])
        code, out, err, took = _serve_once(args, env)
    assert code == 2, out + err
    error = err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert f"port {port} ({flag}) is in use by pid {os.getpid()}" in error and error.endswith(flag), error
    assert "starting" not in out and took < 20, (out, took)  # before the flows are built


# A process that serves both flows through flows_in_subprocess (a spawned flows' process, which jina forks from).
CALLER = r"""
import sys, time
from flows.serving import flows_in_subprocess
from flows.settings import Settings

settings = Settings(host="127.0.0.1", index_port=int(sys.argv[1]), search_port=int(sys.argv[2]), model=sys.argv[3],
                    device="cpu", workspace=sys.argv[4])
with flows_in_subprocess(settings):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_sigkill_of_a_flows_in_subprocess_caller_ends_its_flows(tiny_model, tmp_path):
    ports = (free_port(), free_port())
    proc = subprocess.Popen([sys.executable, "-c", CALLER, *map(str, ports), tiny_model, str(tmp_path / "ws")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        said = []
        while not said or said[-1] and said[-1].strip() != "ready":  # jina's own lines come first
            said.append(proc.stdout.readline())
        assert said[-1].strip() == "ready", "".join(said[-40:])
        tree = _group(proc.pid)
        assert len(tree) >= 8, tree  # the caller, the flows' process and what jina forked from it
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        _wait_gone(tree, timeout=10)
        took = time.monotonic() - killed
        assert all(_port_free(p) for p in ports), ports
        LIFECYCLE_FIGURES["subprocess_flows_gone_after_sigkill_s"] = round(took, 2)
        print(f"\n{len(tree) - 1} flow processes gone {took:.2f} s after SIGKILL of their caller")
    finally:
        _kill_group(proc.pid)
