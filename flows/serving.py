"""Start the index and search flows from ``flow_index.yml`` / ``flow_search.yml`` with overrides.

The YAML files stay the single description of both flows; this module only fills in what
a user chose on the command line or in the environment: host, ports, model, device,
dtype, batch size and workspace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from flows.settings import PROJECT_ROOT, Settings, client_host

logger = logging.getLogger(__name__)

INDEX_FLOW = os.path.join(PROJECT_ROOT, "flow_index.yml")
SEARCH_FLOW = os.path.join(PROJECT_ROOT, "flow_search.yml")
ENCODER_OPTIONS = ("pretrained_model_name_or_path", "device", "dtype", "batch_size", "allowed_roots")
# Executors only ever talk to their flow's gateway on this machine: they listen on loopback whatever the gateway binds.
EXECUTOR_HOST = "127.0.0.1"


def flow_config(path: str, *, host: str, port: int, workspace: str, encoder_options: Dict[str, Any],
                shards: Optional[int] = None, timeout_ready: int = 120_000) -> Dict[str, Any]:
    """The flow YAML as a dict, with host, port, workspace and encoder options set and executor paths made absolute."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(path))
    config.setdefault("with", {}).update(host=host, port=port, timeout_ready=timeout_ready)
    for executor in config.get("executors", []):
        for key in ("uses", "uses_after", "uses_before"):
            uses = executor.get(key)
            if isinstance(uses, str) and uses.endswith((".yml", ".yaml")) and not os.path.isabs(uses):
                executor[key] = os.path.join(base, uses)
        if shards and "shards" in executor:
            executor["shards"] = int(shards)
        if int(executor.get("shards", 1)) == 1:
            # One shard has nothing to merge: without a head and merger each request saves two gRPC hops.
            executor.pop("uses_after", None)
            executor.pop("polling", None)
        if "encoder" in executor.get("name", ""):
            overrides = {k: v for k, v in encoder_options.items() if v is not None}
            executor["uses_with"] = {**(executor.get("uses_with") or {}), **overrides}
        executor["workspace"] = os.path.abspath(workspace)
        executor["host"] = EXECUTOR_HOST
        executor.setdefault("timeout_ready", timeout_ready)
    return config


def skip_empty_argument_check() -> None:
    """jina checks each Flow's arguments against the help of its whole command line (jina's and jcloud's parsers
    built afresh, ~1.7 s on 2 vCPUs) even when no argument is left unknown, which for clipseek's flows is always:
    two flows took ~3.5 s longer to build than to start. The warning of an argument jina does not know stays."""
    import jina.helper

    check = jina.helper.warn_unknown_args
    if getattr(check, "skips_empty", False):
        return

    def warn_unknown_args(unknown_args):
        if unknown_args:
            check(unknown_args)

    warn_unknown_args.skips_empty = True
    jina.helper.warn_unknown_args = warn_unknown_args


def gateway_starts_last(flow) -> None:
    """Start ``flow``'s gateway once its executors listen, not beside them as jina does.

    A gateway asks each executor for its endpoints as soon as it starts and, while one is still loading its
    model, waits a whole second before asking again: a flow of encoders took ~3 s to start where its
    processes were ready in under one. Started last, the gateway finds every executor at the first try.
    An executor that fails to start fails the flow's start as before, naming it."""
    from jina.enums import FlowBuildLevel
    from jina.helper import GATEWAY_NAME

    start = flow.start
    if getattr(start, "gateway_last", False):
        return

    def start_gateway_last():
        if flow._build_level.value < FlowBuildLevel.GRAPH.value:
            flow.build(copy_flow=False)
        gateway = flow._deployment_nodes.get(GATEWAY_NAME)
        if gateway is not None:
            executors = [d for name, d in flow if name != GATEWAY_NAME and not d.external]
            start_gateway = gateway.start

            def start_after_executors():
                for deployment in executors:
                    deployment.wait_start_success()
                return start_gateway()

            gateway.start = start_after_executors
        return start()

    start_gateway_last.gateway_last = True
    flow.start = start_gateway_last


def _pods(flow) -> Iterator[Any]:
    for _, deployment in flow:
        for pod in (deployment.uses_before_pod, deployment.uses_after_pod, deployment.head_pod,
                    getattr(deployment, "gateway_pod", None)):
            if pod is not None:
                yield pod
        for replica_set in (deployment.shards or {}).values():
            yield from getattr(replica_set, "_pods", [])


def mark_dead_pods_shut_down(flow) -> List[str]:
    """The names of ``flow``'s pods whose process is gone (killed, out of memory), marked shut down.

    At close jina waits ``JINA_DEFAULT_TIMEOUT_CTRL`` (60 s) for each pod to say it has shut down, which a
    dead one never does: a server with one dead shard took two minutes to stop."""
    dead = []
    for pod in _pods(flow):
        worker = getattr(pod, "worker", None)
        if worker is None or worker.pid is None or pod.is_shutdown.is_set() or worker.is_alive():
            continue
        pod.is_shutdown.set()
        dead.append(pod.name)
    if dead:
        logger.warning("not waiting for %s at close: the process is gone", ", ".join(dead))
    return dead


def dead_pods_close_at_once(flow) -> None:
    """Once ``flow`` is started, its close marks its dead pods shut down first (``mark_dead_pods_shut_down``)."""
    start = flow.start
    if getattr(start, "closes_dead_pods", False):
        return

    def start_then_watch():
        started = start()
        flow.callback(mark_dead_pods_shut_down, flow)  # the flow's exit stack runs it first, before the pods close
        return started

    start_then_watch.closes_dead_pods = True
    flow.start = start_then_watch


def starting_and_closing_promptly(flow):
    """``flow`` with ``gateway_starts_last`` and ``dead_pods_close_at_once``: what every clipseek flow gets."""
    gateway_starts_last(flow)
    dead_pods_close_at_once(flow)
    return flow


def build_flows(settings: Settings):
    """(index flow, search flow), not started."""
    from jina import Flow

    skip_empty_argument_check()
    draw_internal_ports_outside_ephemeral()

    options = {"pretrained_model_name_or_path": settings.model, "device": settings.device,
               "dtype": settings.dtype, "batch_size": settings.batch_size, "max_megapixels": settings.max_megapixels,
               "url_timeout": settings.url_timeout, "max_download_bytes": settings.max_download_bytes,
               "allow_private_urls": settings.allow_private_urls or None}
    roots = None if settings.allowed_roots is None else [os.path.abspath(os.path.expanduser(r)) for r in settings.allowed_roots]
    index_config = flow_config(INDEX_FLOW, host=settings.host, port=settings.index_port,
                               workspace=settings.workspace, shards=settings.shards,
                               encoder_options={**options, "allowed_roots": roots})
    search_config = flow_config(SEARCH_FLOW, host=settings.host, port=settings.search_port,
                                workspace=settings.workspace, shards=settings.shards,
                                encoder_options={**options, "batch_size": None, "allowed_roots": roots})
    return (starting_and_closing_promptly(Flow.load_config(with_gateway(index_config))),
            starting_and_closing_promptly(Flow.load_config(with_gateway(search_config, search=True))))


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def internal_port_range(path: str = EPHEMERAL_RANGE_FILE) -> Optional[Tuple[int, int]]:
    """Ports for the flows' internal pods (executors, heads) that no outgoing connection can take: above the
    kernel's ephemeral range (Linux: 32768-60999), else below it from 10000; None where it cannot be read or
    leaves fewer than 1,000 ports."""
    try:
        with open(path, encoding="ascii") as f:
            low, high = (int(word) for word in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    if 65535 - high >= 1000:
        return high + 1, 65535
    if low - 10000 >= 1000:
        return 10000, low - 1
    return None


def _split_internal_range() -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    span = internal_port_range()
    if span is None:
        return None
    cut = span[0] + (span[1] - span[0] + 1) // 4
    return (span[0], cut - 1), (cut, span[1])


def pod_port_range() -> Optional[Tuple[int, int]]:
    """The upper three quarters of ``internal_port_range()``: where jina draws the internal pods' ports."""
    split = _split_internal_range()
    return None if split is None else split[1]


def listening_port_range() -> Optional[Tuple[int, int]]:
    """The lower quarter of ``internal_port_range()``: where ``free_port`` draws, so that a port handed out for a
    gateway or a web page can be taken neither by an outgoing connection nor by a pod jina draws meanwhile."""
    split = _split_internal_range()
    return None if split is None else split[0]


def draw_internal_ports_outside_ephemeral() -> None:
    """Make jina draw the internal pods' ports from ``internal_port_range()``. jina draws them (by default from
    49153-65535) when a flow is built and the pod binds one when it starts; a port of the ephemeral range could
    be taken meanwhile as the local end of any connection on the machine, and the flow would fail to start
    (PortAlreadyUsed). JINA_RANDOM_PORT_MIN / _MAX set by the user are kept."""
    if "JINA_RANDOM_PORT_MIN" in os.environ or "JINA_RANDOM_PORT_MAX" in os.environ:
        return
    span = pod_port_range()
    if span is None:
        return
    os.environ["JINA_RANDOM_PORT_MIN"], os.environ["JINA_RANDOM_PORT_MAX"] = str(span[0]), str(span[1])
    from jina import helper

    if any(not span[0] <= port <= span[1] for port in helper.unassigned_ports):
        helper.unassigned_ports.clear()  # drawn before from jina's default range: the next draw starts anew


# The search flow's gateway where its indexer has several shards: a search's liked and disliked ids get the
# vectors of whichever shard keeps them, so every shard builds the same query vector (flows/cluster.py).
FEEDBACK_GATEWAY = {"uses": "FeedbackGateway", "py_modules": ["flows.cluster"]}
# Every other flow's gateway: jina's, answering a single request without thread hand-offs (flows/gateway.py).
CLIPSEEK_GATEWAY = {"uses": "ClipseekGateway", "py_modules": ["flows.gateway"]}


def with_gateway(config: Dict[str, Any], *, search: bool = False) -> Dict[str, Any]:
    """A flow config with clipseek's gateway: ``FEEDBACK_GATEWAY`` for a search flow whose indexer has several
    shards (one shard keeps every vector itself), else ``CLIPSEEK_GATEWAY``; both answer a single request
    without the thread hand-offs of jina's own (flows/gateway.py)."""
    shards = max([int(e.get("shards", 1)) for e in config.get("executors", [])] or [1])
    gateway = FEEDBACK_GATEWAY if search and shards > 1 else CLIPSEEK_GATEWAY
    return {**config, "gateway": {**(config.get("gateway") or {}), **gateway}}


# What every executor needs (torch, transformers, the executors), imported by ``preload``, and by the fork
# server of ``served_in_subprocess`` for every process it starts.
EXECUTOR_MODULES = ("torch", "transformers", "transformers.models.clip.modeling_clip",
                    "executors.clip_image_encoder", "executors.clip_text_encoder", "executors.simple_indexer")


def preload() -> None:
    """Import what every executor needs once, before jina forks them: each executor process then starts with
    the modules already in its (shared, copy-on-write) memory."""
    import importlib

    for name in EXECUTOR_MODULES:
        importlib.import_module(name)


LOG_FILE = "clipseek.log"


def log_path(settings: Settings) -> str:
    """Where a quiet run sends the flows' own logs: ``clipseek.log`` in the workspace."""
    return os.path.join(os.path.abspath(settings.workspace), LOG_FILE)


@contextlib.contextmanager
def output_to(log_file: Optional[str]) -> Iterator[None]:
    """This process's stdout and stderr appended to ``log_file`` (None: left as they are).

    The file descriptors themselves are redirected, so what C libraries write goes there too, and
    every process forked meanwhile (jina's gateway and executors) keeps writing there for its life.
    jina's loggers write plain lines instead of the terminal's rich ones."""
    if log_file is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    old_config = os.environ.get("JINA_LOG_CONFIG")
    os.environ["JINA_LOG_CONFIG"] = "plain"
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
        if old_config is None:
            os.environ.pop("JINA_LOG_CONFIG", None)
        else:
            os.environ["JINA_LOG_CONFIG"] = old_config


# -- Processes that end with the server -----------------------------------------------------------
#
# jina forks a process for each gateway and executor and, left alone, these outlive a server killed
# with SIGKILL: they keep the ports and the index. Each of them (and the flows' own process, when
# they run in one) is told by the kernel when its parent dies (Linux's PR_SET_PDEATHSIG), and
# watches its parent besides, where that is not available or the parent died before it was set.

PR_SET_PDEATHSIG = 1
# What an orphan gets: jina's runtimes stop on SIGTERM, and their executors close what they hold.
ORPHAN_SIGNAL = signal.SIGTERM
# An orphan still alive this long after its parent died is killed.
ORPHAN_GRACE_S = 5.0
PARENT_POLL_S = 0.5

_prctl: Any = None
_tie = {"depth": 0, "forking_pid": 0, "registered": False}
_tie_lock = threading.Lock()


def _libc_prctl():
    """libc's prctl, or None off Linux or where it cannot be found."""
    global _prctl
    if _prctl is None:
        _prctl = False
        if sys.platform.startswith("linux"):
            try:
                _prctl = ctypes.CDLL(None, use_errno=True).prctl
            except (OSError, AttributeError):
                _prctl = False
    return _prctl or None


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where it cannot.

    The kernel's "parent" is the thread that forked this process: that thread must live as long as
    this process should (jina forks its gateways and executors from the thread that enters the flow)."""
    prctl = _libc_prctl()
    if prctl is None:
        return False
    return prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), ctypes.c_ulong(0), ctypes.c_ulong(0),
                 ctypes.c_ulong(0)) == 0


def die_with_parent(parent_pid: int) -> bool:
    """End this process soon after ``parent_pid``, its parent, dies, whatever kills it.

    It gets ``ORPHAN_SIGNAL`` from the kernel (or, without prctl, from a thread that watches the
    parent), and SIGKILL if it is still there ``ORPHAN_GRACE_S`` later. Returns whether prctl took."""
    armed = set_parent_death_signal(ORPHAN_SIGNAL)
    watcher = threading.Thread(target=_watch_parent, args=(parent_pid, armed), name="clipseek-parent-watch",
                               daemon=True)
    watcher.start()
    if os.getppid() != parent_pid:  # the parent died before prctl: nothing will tell this process
        os.kill(os.getpid(), ORPHAN_SIGNAL)
    return armed


def _watch_parent(parent_pid: int, signalled_by_kernel: bool) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    _end_as_orphan(signal_first=not signalled_by_kernel)


def _end_as_orphan(signal_first: bool) -> None:
    """``ORPHAN_SIGNAL`` to this process (unless the kernel sends it), then SIGKILL ``ORPHAN_GRACE_S`` later."""
    if signal_first:
        os.kill(os.getpid(), ORPHAN_SIGNAL)
    time.sleep(ORPHAN_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_caller(caller_pid: int) -> None:
    """End this process soon after ``caller_pid`` dies, whether that is its parent or (started by a fork
    server) not: ``ORPHAN_SIGNAL``, then SIGKILL ``ORPHAN_GRACE_S`` later. A fork server's child is tied to
    it too (``die_with_parent``): the server exits with its last caller."""
    parent = os.getppid()
    die_with_parent(parent)
    if parent != caller_pid:
        threading.Thread(target=_watch_caller, args=(caller_pid,), name="clipseek-caller-watch", daemon=True).start()


def _watch_caller(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        pass  # already gone
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): asked twice a second
        while _alive(pid):
            time.sleep(PARENT_POLL_S)
    else:
        select.select([handle], [], [])  # readable once the process has exited
        os.close(handle)
    _end_as_orphan(signal_first=True)


def _before_fork() -> None:
    _tie["forking_pid"] = os.getpid()


def _after_fork_in_child() -> None:
    if _tie["depth"] > 0:
        die_with_parent(_tie["forking_pid"])


@contextlib.contextmanager
def children_die_with_this_process() -> Iterator[None]:
    """Every process forked from this one meanwhile, and from those in turn, ends when its parent does."""
    with _tie_lock:
        if not _tie["registered"] and hasattr(os, "register_at_fork"):
            _libc_prctl()  # looked up once here, not in each child
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
            _tie["registered"] = True
        _tie["depth"] += 1
    try:
        yield
    finally:
        with _tie_lock:
            _tie["depth"] -= 1


# -- One server per workspace --------------------------------------------------------------------------

LOCK_FILE = "clipseek-serve.lock"
# After its server was killed, its flows' processes hold the workspace for a few more seconds.
LOCK_WAIT_S = ORPHAN_GRACE_S + 5.0
_held_workspaces: Dict[str, list] = {}


class WorkspaceInUse(RuntimeError):
    """Another server runs on this workspace."""


def lock_path(workspace: str) -> str:
    return os.path.join(os.path.realpath(workspace), LOCK_FILE)


def workspace_owner(workspace: str) -> Optional[Dict[str, Any]]:
    """What the server that last locked ``workspace`` wrote of itself (pid, host, ports), if anything."""
    try:
        with open(lock_path(workspace), encoding="utf-8") as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[:1]
        return state not in (["Z"], ["X"])  # a zombie is dead, only not yet reaped
    except OSError:
        return True


def _describe_owner(owner: Optional[Dict[str, Any]]) -> str:
    if owner is None:
        return "another server"
    ports = [f"{name} port {owner[key]}" for key, name in (("index_port", "index"), ("search_port", "search"),
                                                           ("web_port", "web")) if owner.get(key)]
    return f"clipseek serve pid {owner['pid']}" + (f" ({', '.join(ports)})" if ports else "")


@contextlib.contextmanager
def workspace_lock(settings: Settings, web_port: Optional[int] = None, wait: float = LOCK_WAIT_S) -> Iterator[None]:
    """This process is the one server of ``settings.workspace`` until the block ends.

    An flock on the workspace's ``clipseek-serve.lock``, which also says who holds it (pid, host, ports).
    The kernel drops the lock when the last process holding it dies (the processes forked meanwhile hold
    it too), so a file left by a killed server blocks nobody. Raises WorkspaceInUse at once when a live
    server holds it; waits up to ``wait`` seconds while only the processes of a dead one still do.
    Re-entering it in the process that holds it is a no-op."""
    import fcntl

    path = lock_path(settings.workspace)
    if path in _held_workspaces:
        _held_workspaces[path][1] += 1
        try:
            yield
        finally:
            _held_workspaces[path][1] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = workspace_owner(settings.workspace)
                waited = time.monotonic() - start
                where = os.path.dirname(path)
                if owner is not None and _alive(owner["pid"]) or owner is None and waited > min(wait, 2.0):
                    raise WorkspaceInUse(f"workspace {where} is already served by {_describe_owner(owner)}; "
                                         f"stop it first, or serve another --workspace") from None
                if waited > wait:
                    raise WorkspaceInUse(f"workspace {where} is still held by the processes of "
                                         f"{_describe_owner(owner)}, which is gone; they did not exit "
                                         f"in {wait:.0f} s") from None
                time.sleep(0.1)  # being written, or a dead server's flows on their way out
        owner = {"pid": os.getpid(), "host": settings.host, "index_port": settings.index_port,
                 "search_port": settings.search_port, "web_port": web_port, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)
        _held_workspaces[path] = [fd, 1]
        try:
            yield
        finally:
            del _held_workspaces[path]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock, unless a child forked meanwhile still holds it


# -- Ports ---------------------------------------------------------------------------------------------------


class PortInUse(OSError):
    """A port ``clipseek serve`` would listen on is taken."""


def port_holder(port: int) -> Optional[Tuple[int, str]]:
    """(pid, command line) of the process listening on TCP ``port`` on this machine, where it can be read
    (Linux: /proc/net/tcp and the processes' open sockets; only processes this user may look into)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(fields[9])
        except (OSError, ValueError):
            continue
    inodes.discard("0")
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        pids = sorted((int(name) for name in os.listdir("/proc") if name.isdigit()))
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    break
            except OSError:
                continue
        else:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = ""
        return pid, command
    return None


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # what jina itself checks before it starts
        s.settimeout(1.0)
        return s.connect_ex((client_host(host), port)) == 0


def check_ports(settings: Settings, web: bool = False) -> None:
    """Raise PortInUse, naming the port, the flag that moves it and who holds it, when a port of the
    server is taken (or given twice): before the flows are built, instead of jina's error after."""
    wanted: List[Tuple[int, str]] = [(settings.index_port, "--index-port"), (settings.search_port, "--search-port")]
    if web:
        wanted.append((settings.web_port, "--web-port"))
    seen: Dict[int, str] = {}
    for port, flag in wanted:
        if port in seen:
            raise PortInUse(f"port {port} is given to both {seen[port]} and {flag}; choose another with {flag}")
        seen[port] = flag
        if _port_taken(settings.host, port):
            holder = port_holder(port)
            by = "" if holder is None else f" by pid {holder[0]}" + (f" ({holder[1][:80]})" if holder[1] else "")
            raise PortInUse(f"port {port} ({flag}) is in use{by}; stop it or choose another port with {flag}")


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    """``name``'s logger at ``level`` or finer meanwhile (the processes forked meanwhile keep it)."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(min(level, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(before)


def check_workspace(settings: Settings) -> None:
    """RuntimeError, before anything starts, when the workspace's index was written by another number of
    shards than the flows would run (a picture's shard is a hash of its id over that number), or holds
    embeddings of another model than the flows would load (every search and index request would fail)."""
    from executors.models.loading import default_model, model_id
    from executors.store.vector_store import recorded_meta, shards_of

    meta = recorded_meta(os.path.join(settings.workspace, "SimpleIndexer"))
    wanted = settings.shards or _yaml_shards(INDEX_FLOW)
    have = shards_of(meta)
    if have is not None and have != wanted:
        raise RuntimeError(f"the index in {settings.workspace} was written by {have} shard(s); these flows run "
                           f"{wanted}. Start with --shards {have} (or index into a new --workspace)")
    stored, model = meta.get("model"), model_id(settings.model or default_model())
    if stored and stored != model:
        raise RuntimeError(f"the index in {settings.workspace} holds embeddings of model {stored!r}; these flows "
                           f"would load {model!r}. Start with --model naming {stored!r} (its hub name or folder), or "
                           f"serve another --workspace")


def _yaml_shards(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    return max([int(e.get("shards", 1)) for e in config.get("executors", []) if "shards" in e] or [1])


@contextlib.contextmanager
def running_flows(settings: Settings, log_file: Optional[str] = None, lock: bool = True) -> Iterator[Tuple[Any, Any]]:
    """Both flows started (index first: it creates the index the search flow opens), closed on exit.

    With ``log_file``, jina's and transformers' output while the flows start and stop, and everything
    their processes write, go to that file instead of the console. With ``lock``, this process holds the
    workspace (``workspace_lock``) meanwhile. The gateways and executors jina forks end with this process,
    however it ends; enter this from a thread that lives as long as the flows (the main thread)."""
    with contextlib.ExitStack() as outer:
        if lock:
            outer.enter_context(workspace_lock(settings))
        outer.enter_context(children_die_with_this_process())
        check_workspace(settings)
        if log_file:  # the executors' own account (the model, its precision and why) goes to the log file,
            outer.enter_context(_logger_level("executors", logging.INFO))
            outer.enter_context(_logger_level("flows.gateway", logging.INFO))  # and the gateways'
        with output_to(log_file):
            preload()
            index_flow, search_flow = build_flows(settings)
        with contextlib.ExitStack() as stack:
            with output_to(log_file):
                stack.enter_context(index_flow)
                stack.enter_context(search_flow)
            logger.info("index flow on %s:%d, search flow on %s:%d", settings.host, settings.index_port,
                        settings.host, settings.search_port)
            try:
                yield index_flow, search_flow
            finally:
                with output_to(log_file):
                    stack.close()


def _serve_until_stopped(settings: Settings, start_method: str, ready, stop, errors,
                         log_file: Optional[str] = None, lock: bool = True) -> None:
    import multiprocessing

    try:
        # jina starts the executors the way the caller would have (fork on Linux), from this process, which
        # runs no threads yet but the (sleeping, lock-free) watches of its parent and its caller.
        multiprocessing.set_start_method(start_method, force=True)
        with running_flows(settings, log_file, lock=lock):
            ready.set()
            stop.wait()
    except BaseException as e:  # reported to the parent, which raises it
        errors.put(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def flows_in_subprocess(settings: Settings, timeout: float = 300.0, log_file: Optional[str] = None) -> Iterator[None]:
    """Both flows served by a fresh Python process (``served_in_subprocess``), stopped on exit.

    jina starts each executor by forking the process that enters the flow. A process that
    already runs threads of its own (torch's, gRPC's, a web server's) should not fork; this
    starts the flows from a clean process instead: one from a fork server that has imported torch,
    transformers and the executors once, so that flows started again in the same session start ~5 s sooner.

    That process and the ones jina forks from it end with this one, however it ends. It holds
    the workspace (``workspace_lock``), unless this process already does.
    """
    import multiprocessing

    lock = lock_path(settings.workspace) not in _held_workspaces
    with served_in_subprocess(_serve_until_stopped, "clipseek-flows", timeout,
                              settings, multiprocessing.get_start_method(), log_file=log_file, lock=lock):
        yield


# What a process started by ``served_in_subprocess`` imports before it runs (the executors' modules and the
# flows' targets): with a fork server these are imported once, in the server, and every process it starts
# afterwards has them (~5 s on 2 vCPUs).
PRELOADED_MODULES = [*EXECUTOR_MODULES, "jina", "flows.serving", "flows.cluster"]


def subprocess_context():
    """The multiprocessing context ``served_in_subprocess`` starts its processes with: a fork server that has
    imported ``PRELOADED_MODULES`` (a clean, single-threaded process started afresh, as spawn would: nothing
    of the caller's threads or state is forked), spawn where there is none."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED_MODULES)  # read when the server starts, by the first call
    return context


def _run_for(caller_pid: int, environment: Dict[str, str], target, *args, **kwargs) -> None:
    # A fork server's children get its environment, from when it started: this one gets its caller's, as now.
    os.environ.clear()
    os.environ.update(environment)
    die_with_caller(caller_pid)
    target(*args, **kwargs)


@contextlib.contextmanager
def served_in_subprocess(target, name: str, timeout: float, *args, **kwargs) -> Iterator[None]:
    """``target(*args, ready, stop, errors, **kwargs)`` in a fresh Python process (``subprocess_context``): it
    sets ``ready`` once serving, serves until ``stop`` is set and puts what went wrong in ``errors``. Returns
    once it is ready (RuntimeError with its reason if it never is); stops it on exit. The process, with this
    one's environment, ends soon after this one does, however this one ends."""
    import queue

    context = subprocess_context()
    ready, stop, errors = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=_run_for, args=(os.getpid(), dict(os.environ), target, *args, ready, stop, errors),
                              kwargs=kwargs, name=name)
    process.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if not process.is_alive() or time.monotonic() > deadline:
                try:
                    reason = errors.get(timeout=1)
                except queue.Empty:
                    reason = f"exit code {process.exitcode}" if not process.is_alive() else f"not ready after {timeout:.0f} s"
                raise RuntimeError(f"the flows did not start: {reason}")
        yield
    finally:
        stop.set()
        process.join(120)
        if process.is_alive():
            logger.warning("the process %s did not stop in time; terminating it", name)
            process.terminate()
            process.join(30)


def _binds(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


_handed_out: set = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that binds now, drawn from ``listening_port_range()``: a port of the kernel's ephemeral
    range could be taken as the local end of any outgoing connection before the server binds it
    (PortAlreadyUsed), and the pods' ports are drawn elsewhere. Where that range is unknown, one the OS picks.
    A port this process was given before comes back only when no other one binds: two calls in a row (an
    index and a search port, bound later) get two ports."""
    span = listening_port_range()
    if span is not None:
        candidates = random.sample(range(span[0], span[1] + 1), min(200, span[1] - span[0] + 1))
        for port in sorted(candidates, key=lambda p: p in _handed_out):  # stable: the draw's order otherwise
            if _binds(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
