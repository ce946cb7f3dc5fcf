"""Both flows over one set of indexer shard processes, the topology ``clipseek export`` writes for a cluster.

The index flow runs the indexer as jina runs any sharded executor: one process per shard behind a head,
with the ``ShardMerger`` after them. The search flow has no indexer of its own: each of its shards is a
jina ``external`` executor that points at the index flow's shard process (on a cluster, the shard's
Service in the index namespace), and a ``ShardMerger`` that needs all of them makes the global top-k.
So every shard is exactly one process, the one writer of its files, and its ``/search``, ``/lookup``,
``/list`` and ``/status`` answer the search flow too.

A shard process writes whatever reaches it, so ``read_only`` on the search flow's indexer has no process
left to act on. The search flow's gateway refuses ``/index``, ``/update``, ``/delete`` and ``/clear``
itself (``ReadOnlyGateway``), before any executor sees them. It has to be the gateway: jina lets a client
name the executors a request goes to (``target_executor``), so any executor put in front of the shards to
refuse writes could be skipped, and a jina head forwards a request to its shards even when its
``uses_before`` answered with an error.

The gateway also gives a search's liked and disliked ids the vectors the shards keep for them, whichever
shard that is (``FeedbackGateway``, which ``clipseek serve --shards N`` runs too), so that every shard
searches with the same query vector.

``running_shared_flows`` / ``shared_flows_in_subprocess`` start the same topology on one machine, every
process on 127.0.0.1, the search flow reaching the shards over gRPC at the ports the index flow gave them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
from jina.serve.runtimes.gateway.grpc import GRPCGateway

from executors.shard_merger import FEEDBACK_VECTORS, VECTORS_ENDPOINT
from flows.gateway import ClipseekGateway
from flows.settings import PROJECT_ROOT, Settings

INDEXER = "indexer"
# What the search flow's gateway refuses: every endpoint of the indexer that writes.
WRITE_ENDPOINTS = ("/index", "/update", "/delete", "/clear")
READ_ONLY_GATEWAY = os.path.join(PROJECT_ROOT, "executors", "read_only_gateway.yml")


def refusal(endpoint: str) -> str:
    """What a client that sends a write to the search flow reads (the read-only indexer's own words)."""
    return (f"{endpoint} is refused here: this flow reads the index and never writes it; "
            f"send {endpoint} to the index flow")


def _refused(request: Any) -> Optional[str]:
    header = getattr(request, "header", None)
    endpoint = getattr(header, "exec_endpoint", None)
    return endpoint if endpoint in WRITE_ENDPOINTS else None


class _RequestCheck(grpc.aio.ServerInterceptor):
    """Runs ``check`` on every request of a call before the gateway routes it; a request it answers with
    (status code, message) ends the call with that status. A stream is cut at that request: the requests
    before it are answered, then the call ends with the status; that request and what follows reach no
    executor."""

    async def check(self, request: Any) -> Optional[Tuple[Any, str]]:
        raise NotImplementedError

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        common = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        check = self.check
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                stop = await check(request)
                if stop:
                    await context.abort(*stop)
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **common)
        if handler.unary_stream is not None:
            inner_unary_stream = handler.unary_stream

            async def unary_stream(request, context):
                stop = await check(request)
                if stop:
                    await context.abort(*stop)
                async for response in inner_unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **common)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                stops: List[Tuple[Any, str]] = []

                async def until_stopped():
                    async for request in request_iterator:
                        stop = await check(request)
                        if stop:
                            stops.append(stop)
                            return  # the gateway sees the stream end; aborting here would leave it hanging
                        yield request

                async for response in inner_stream(until_stopped(), context):
                    yield response
                if stops:
                    await context.abort(*stops[0])

            return grpc.stream_stream_rpc_method_handler(stream, **common)
        return handler


class _RefuseWrites(_RequestCheck):
    """Ends any call that carries a write endpoint with PERMISSION_DENIED, before the gateway routes it."""

    async def check(self, request: Any) -> Optional[Tuple[Any, str]]:
        endpoint = _refused(request)
        return (grpc.StatusCode.PERMISSION_DENIED, refusal(endpoint)) if endpoint else None


def feedback_ids(request: Any) -> List[str]:
    """The liked and disliked ids of a ``/search`` request that sends no vectors for them (else none)."""
    header = getattr(request, "header", None)
    if getattr(header, "exec_endpoint", None) != "/search":
        return []
    parameters = request.parameters
    if parameters.get(FEEDBACK_VECTORS) is not None:
        return []
    ids: List[str] = []
    for key in ("like", "unlike"):
        value = parameters.get(key)
        values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        ids += [v for v in values if isinstance(v, str) and v not in ids]  # anything else: the shards refuse it
    return ids


class _FeedbackVectors(_RequestCheck):
    """Gives a ``/search`` that names liked or disliked ids the stored vectors of those ids, fetched first through
    the same flow (``/vectors``, which every shard answers and the ShardMerger merges), as the parameter
    ``FEEDBACK_VECTORS``: so every shard builds its query vector from all of them, wherever they are kept.

    A search whose lookup fails ends with that error (a shard that failed or is down): its answer would be
    built from the vectors of some shards only."""

    def __init__(self, gateway: GRPCGateway):
        self._gateway = gateway

    async def _add_vectors(self, request: Any) -> Optional[str]:
        """None once ``request`` carries the vectors it needs; else why they could not be had."""
        ids = feedback_ids(request)
        if not ids:
            return None
        import numpy as np
        from docarray import DocList
        from jina.proto import jina_pb2
        from jina.types.request.data import DataRequest

        from executors.docs import QueryPart
        from flows.transport import server_message

        lookup = DataRequest()
        lookup.header.exec_endpoint = VECTORS_ENDPOINT
        lookup.data.docs = DocList[QueryPart]([QueryPart(id=i) for i in ids])
        try:
            answer = await self._gateway.streamer.process_single_data(lookup)
        except Exception as e:  # noqa: BLE001 - the search's answer
            return (shard_down(VECTORS_ENDPOINT, str(e), external_shards(self._gateway))
                    or f"the vectors of the liked / disliked ids could not be read: {e}")
        status = answer.header.status
        if status.code == jina_pb2.StatusProto.ERROR:
            return server_message(str(status.description or status.exception.name or "the lookup failed"))
        answer.document_array_cls = DocList[QueryPart]
        parameters = request.parameters
        parameters[FEEDBACK_VECTORS] = {d.id: np.asarray(d.embedding, dtype=np.float32).ravel().tolist()
                                        for d in answer.docs if d.embedding is not None}
        request.parameters = parameters
        return None

    async def check(self, request: Any) -> Optional[Tuple[Any, str]]:
        failure = await self._add_vectors(request)
        return (grpc.StatusCode.INTERNAL, failure) if failure else None


SHARD_DOWN = re.compile(r"Communication error with deployment (indexer_(\d+)) at")


def external_shards(gateway: GRPCGateway) -> int:
    """How many indexer shards a search flow's gateway reaches as external executors (``indexer_<k>``)."""
    try:
        addresses = json.loads(getattr(gateway.runtime_args, "deployments_addresses", None) or "{}")
    except (TypeError, ValueError):
        return 0
    return sum(1 for name in addresses if re.fullmatch(r"indexer_\d+", name))


def shard_down(endpoint: str, message: str, shards: int = 0) -> Optional[str]:
    """What a client reads where jina's gateway could not reach the search flow's shard ``indexer_<k>``
    (``message`` is jina's error), in the ShardMerger's words; None for any other error."""
    down = SHARD_DOWN.search(message or "")
    if not down:
        return None
    of = f" of {shards}" if shards else ""
    return (f"{endpoint}: indexer shard {down.group(2)}{of} did not answer ({down.group(1)} is down or "
            f"unreachable): the other shards alone would give a partial answer")


class _UnaryFailures(grpc.aio.ServerInterceptor):
    """Ends a single request that jina's gateway failed (an executor it could not reach) with that status alone.

    jina answers such a request with an empty message besides the status, which grpc's client cannot read
    (jina's ``DataRequest`` refuses to be copied): the client would see "the buffer is already decompressed".
    A search flow shard it could not reach (``indexer_<k>``) is named, as the ShardMerger names the shards
    it lacks: the others alone would give a partial answer."""

    def __init__(self, gateway: GRPCGateway):
        self._gateway = gateway

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner_unary = handler.unary_unary

        async def unary(request, context):
            response = await inner_unary(request, context)
            code = context.code()
            if code is None or code == grpc.StatusCode.OK:
                return response
            message = (context.details() or str(code)).strip()
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            endpoint = getattr(getattr(request, "header", None), "exec_endpoint", "") or "the request"
            down = shard_down(endpoint, message, external_shards(self._gateway))
            if down:
                await context.abort(grpc.StatusCode.INTERNAL, down)
            await context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class FeedbackGateway(ClipseekGateway):
    """jina's gRPC gateway for a search flow whose indexer has several shards: a search's liked and disliked
    ids get their vectors from whichever shard keeps them (``_FeedbackVectors``), and a request that a shard
    it could not reach failed ends with an error naming that shard (``_UnaryFailures``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.grpc_tracing_server_interceptors = [*(self.grpc_tracing_server_interceptors or []),
                                                 _UnaryFailures(self), _FeedbackVectors(self)]


class ReadOnlyGateway(FeedbackGateway):
    """The ``FeedbackGateway``, refusing every write endpoint (``WRITE_ENDPOINTS``) of the flow behind it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # first: a write is refused before anything else looks at it
        self.grpc_tracing_server_interceptors = [_RefuseWrites(), *(self.grpc_tracing_server_interceptors or [])]


# -- Flow configs ------------------------------------------------------------------------------------------


def indexer_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The flow config's indexer entry."""
    for executor in config.get("executors", []):
        if executor.get("name") == INDEXER:
            return executor
    raise ValueError(f"the flow has no executor named {INDEXER!r}")


def shard_count(config: Dict[str, Any]) -> int:
    return int(indexer_of(config).get("shards", 1))


def shard_names(shards: int) -> List[str]:
    """The names jina gives the shard processes of the indexer (their Services on Kubernetes, their
    services in docker compose)."""
    return [f"{INDEXER}-{k}" for k in range(shards)] if shards > 1 else [INDEXER]


def external_names(shards: int) -> List[str]:
    """The search flow's executors for those shards (jina wants identifiers here)."""
    return [f"{INDEXER}_{k}" for k in range(shards)] if shards > 1 else [INDEXER]


def pin_shard_ports(index_config: Dict[str, Any], ports: Sequence[int]) -> Dict[str, Any]:
    """The index flow config with its indexer's shard ``k`` listening on ``ports[k]``."""
    config = copy.deepcopy(index_config)
    indexer = indexer_of(config)
    shards = int(indexer.get("shards", 1))
    if len(ports) != shards:
        raise ValueError(f"{len(ports)} port(s) for {shards} shard(s)")
    if shards > 1:
        indexer["peer_ports"] = json.dumps({str(k): [int(p)] for k, p in enumerate(ports)})
    else:
        indexer["port"] = int(ports[0])
    return config


def shared_search_config(search_config: Dict[str, Any], shard_addresses: Sequence[Tuple[str, int]], *,
                         gateway_uses: str = READ_ONLY_GATEWAY) -> Dict[str, Any]:
    """The search flow config with its indexer replaced by the index flow's shards.

    Shard ``k`` becomes the external executor ``indexer_k`` at ``shard_addresses[k]`` (one shard: the
    external executor ``indexer``); with several, a ``ShardMerger`` named ``indexer`` (the indexer's
    ``uses_after``, with its ``limit`` and the number of shards, whose answers it expects) needs all of them
    and gets their answers side by side (``no_reduce``), as the head's ``uses_after`` does in the index
    flow. The gateway is ``gateway_uses`` (``ReadOnlyGateway``): the shards write whatever reaches them."""
    config = copy.deepcopy(search_config)
    executors = config["executors"]
    indexer = indexer_of(config)
    position = executors.index(indexer)
    shards = int(indexer.get("shards", 1))
    if len(shard_addresses) != shards:
        raise ValueError(f"the search flow runs {shards} indexer shard(s); the index flow gave "
                         f"{len(shard_addresses)}: both flows must run the same number of shards")
    if int(indexer.get("replicas", 1)) != 1:
        raise ValueError("an indexer shard is one process: replicas of the indexer must be 1")
    if position == 0 or position != len(executors) - 1:
        raise ValueError("the search flow's indexer must come last, after the encoders")
    previous = executors[position - 1]["name"]
    names = external_names(shards)
    externals = [{"name": name, "external": True, "host": host, "port": int(port), "needs": [previous]}
                 for name, (host, port) in zip(names, shard_addresses)]
    replaced = externals
    if shards > 1:
        merger = {"name": INDEXER, "uses": indexer["uses_after"], "needs": names, "no_reduce": True,
                  "uses_with": {"limit": (indexer.get("uses_with") or {}).get("limit", 10), "shards": shards}}
        for key in ("host", "workspace", "timeout_ready"):
            if key in indexer:
                merger[key] = indexer[key]
        replaced = [*externals, merger]
    config["executors"] = [*executors[:position], *replaced]
    config["gateway"] = {**(config.get("gateway") or {}), "uses": gateway_uses}
    return config


# -- On one machine ---------------------------------------------------------------------------------------


def build_shared_flows(settings: Settings, shard_ports: Optional[Sequence[int]] = None):
    """(index flow, search flow), not started: the search flow's shards are the index flow's processes."""
    from jina import Flow

    from flows.serving import (EXECUTOR_HOST, INDEX_FLOW, SEARCH_FLOW, flow_config, free_port, skip_empty_argument_check,
                               starting_and_closing_promptly)

    skip_empty_argument_check()

    options = {"pretrained_model_name_or_path": settings.model, "device": settings.device,
               "dtype": settings.dtype, "batch_size": settings.batch_size, "max_megapixels": settings.max_megapixels,
               "url_timeout": settings.url_timeout, "max_download_bytes": settings.max_download_bytes,
               "allow_private_urls": settings.allow_private_urls or None}
    roots = None if settings.allowed_roots is None else [os.path.abspath(os.path.expanduser(r)) for r in settings.allowed_roots]
    index_config = flow_config(INDEX_FLOW, host=settings.host, port=settings.index_port, workspace=settings.workspace,
                               shards=settings.shards, encoder_options={**options, "allowed_roots": roots})
    ports = list(shard_ports) if shard_ports else [free_port(EXECUTOR_HOST) for _ in range(shard_count(index_config))]
    index_config = pin_shard_ports(index_config, ports)
    search_config = flow_config(SEARCH_FLOW, host=settings.host, port=settings.search_port,
                                workspace=settings.workspace, shards=settings.shards,
                                encoder_options={**options, "batch_size": None, "allowed_roots": roots})
    search_config = shared_search_config(search_config, [(EXECUTOR_HOST, p) for p in ports])
    return (starting_and_closing_promptly(Flow.load_config(index_config)),
            starting_and_closing_promptly(Flow.load_config(search_config)))


@contextlib.contextmanager
def running_shared_flows(settings: Settings, shard_ports: Optional[Sequence[int]] = None) -> Iterator[Tuple[Any, Any]]:
    """Both flows started (the index flow first: it starts the shard processes), closed on exit. This
    process holds the workspace meanwhile; enter it from a thread that lives as long as the flows."""
    from flows.serving import check_workspace, children_die_with_this_process, preload, workspace_lock

    with contextlib.ExitStack() as stack:
        stack.enter_context(workspace_lock(settings))
        stack.enter_context(children_die_with_this_process())
        check_workspace(settings)
        preload()
        index_flow, search_flow = build_shared_flows(settings, shard_ports)
        stack.enter_context(index_flow)
        stack.enter_context(search_flow)
        yield index_flow, search_flow


def _serve_shared(settings: Settings, start_method: str, ready, stop, errors) -> None:
    import multiprocessing

    try:
        multiprocessing.set_start_method(start_method, force=True)
        with running_shared_flows(settings):
            ready.set()
            stop.wait()
    except BaseException as e:  # reported to the parent, which raises it
        errors.put(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def shared_flows_in_subprocess(settings: Settings, timeout: float = 300.0) -> Iterator[None]:
    """``running_shared_flows`` in a fresh Python process (``served_in_subprocess``, as ``flows_in_subprocess``
    does for ``clipseek serve``'s flows), stopped on exit."""
    import multiprocessing

    from flows.serving import served_in_subprocess

    with served_in_subprocess(_serve_shared, "clipseek-shared-flows", timeout, settings,
                              multiprocessing.get_start_method()):
        yield
