"""Start the index and search flows from ``flow_index.yml`` / ``flow_search.yml`` with overrides.

The YAML files stay the single description of both flows; this module only fills in what
a user chose on the command line or in the environment: host, ports, model, device,
dtype, batch size and workspace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from typing import Any, Dict, Iterator, Optional, Tuple

import yaml

from flows.settings import PROJECT_ROOT, Settings

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


def build_flows(settings: Settings):
    """(index flow, search flow), not started."""
    from jina import Flow

    options = {"pretrained_model_name_or_path": settings.model, "device": settings.device,
               "dtype": settings.dtype, "batch_size": settings.batch_size, "max_megapixels": settings.max_megapixels,
               "url_timeout": settings.url_timeout, "max_download_bytes": settings.max_download_bytes,
               "allow_private_urls": settings.allow_private_urls or None}
    roots = None if settings.allowed_roots is None else [os.path.abspath(os.path.expanduser(r)) for r in settings.allowed_roots]
    index_flow = Flow.load_config(flow_config(INDEX_FLOW, host=settings.host, port=settings.index_port,
                                                 workspace=settings.workspace, shards=settings.shards,
                                                 encoder_options={**options, "allowed_roots": roots}))
    search_flow = Flow.load_config(flow_config(SEARCH_FLOW, host=settings.host, port=settings.search_port,
                                               workspace=settings.workspace, shards=settings.shards,
                                               encoder_options={**options, "batch_size": None, "allowed_roots": roots}))
    return index_flow, search_flow


def preload() -> None:
    """Import what every executor needs (torch, transformers, the executors) once, before jina forks them:
    each executor process then starts with the modules already in its (shared, copy-on-write) memory."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import CLIPModel  # noqa: F401

    import executors.clip_image_encoder  # noqa: F401
    import executors.clip_text_encoder  # noqa: F401
    import executors.simple_indexer  # noqa: F401


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


@contextlib.contextmanager
def running_flows(settings: Settings, log_file: Optional[str] = None) -> Iterator[Tuple[Any, Any]]:
    """Both flows started (index first: it creates the index the search flow opens), closed on exit.

    With ``log_file``, jina's and transformers' output while the flows start and stop, and everything
    their processes write, go to that file instead of the console."""
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
                         log_file: Optional[str] = None) -> None:
    import multiprocessing

    try:
        # A spawned process defaults to spawning its own children; jina starts the executors the way the
        # parent would have (fork on Linux), from this process, which has no threads yet.
        multiprocessing.set_start_method(start_method, force=True)
        with running_flows(settings, log_file):
            ready.set()
            stop.wait()
    except BaseException as e:  # reported to the parent, which raises it
        errors.put(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def flows_in_subprocess(settings: Settings, timeout: float = 300.0, log_file: Optional[str] = None) -> Iterator[None]:
    """Both flows served by a fresh Python process (started by spawn), stopped on exit.

    jina starts each executor by forking the process that enters the flow. A process that
    already runs threads of its own (torch's, gRPC's, a web server's) should not fork; this
    starts the flows from a clean interpreter instead, as ``clipseek serve`` does.
    """
    import multiprocessing
    import queue
    import time

    context = multiprocessing.get_context("spawn")
    ready, stop, errors = context.Event(), context.Event(), context.Queue()
    process = context.Process(target=_serve_until_stopped,
                              args=(settings, multiprocessing.get_start_method(), ready, stop, errors, log_file),
                              name="clipseek-flows")
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
            logger.warning("the flows' process did not stop in time; terminating it")
            process.terminate()
            process.join(30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
