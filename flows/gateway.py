"""The gateway every flow ``clipseek serve`` starts: jina's gRPC gateway, answering a single request on its event loop.

jina's gateway answers a unary request (``process_single_data``, the call clipseek's client makes for every
search, index batch and status) by streaming a one-item list iterator through its ``RequestStreamer``, which
reads each item of a plain iterator in a thread of the event loop's default executor, so that a client's
blocking generator cannot stall the loop. For a list iterator that never blocks this costs two thread
hand-offs per request (the item, then the end of the list): without them a flow of two executors that do
nothing took 0.95x the time, of three 0.92x (``benchmarks/gateway_floor.py``, 2 vCPUs, AVX2).
``ClipseekGateway`` reads such iterators on the loop itself; ``flows.serving.with_gateway`` names it in
every flow config ``clipseek serve`` builds.
Requests that stream from a client (jina's ``Client.post``) arrive as an async iterator and were never sent to
a thread; they are unchanged.

The gateway also deep-copies its graph of executors for every request, and with it what it learnt from each
executor when the flow started: its endpoints, their JSON schemas (a protobuf message) and the document
classes made from them, none of which a request changes. ``share_what_requests_only_read`` has the copy share
those (``SHARED_NODE_STATE``) and copy everything else as before.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from jina.serve.runtimes.gateway.grpc import GRPCGateway

logger = logging.getLogger(__name__)


def read_single_requests_on_loop(request_handler: Any) -> bool:
    """Make the ``RequestStreamer`` behind jina's gateway request handler read plain (non-async) request
    iterators on the event loop instead of in a thread; False, with a warning, where that jina has no such
    streamer (the gateway then works as jina's own does)."""
    streamer = getattr(getattr(request_handler, "streamer", None), "_streamer", None)
    if streamer is None or not hasattr(streamer, "_iterate_sync_in_thread"):
        logger.warning("this jina's gateway has no RequestStreamer to configure: single requests keep their thread "
                       "hand-offs")
        return False
    streamer._iterate_sync_in_thread = False
    return True


# What a node of jina's request graph learns when the flow starts and only reads afterwards: set by jina's
# ``get_endpoints`` on the gateway's own graph, read by every request's copy of it.
SHARED_NODE_STATE = frozenset({"logger", "endpoints", "_endpoints_proto", "_pydantic_models_by_endpoint"})


def _copy_node(node: Any, memo: dict) -> Any:
    """A graph node for one request: ``SHARED_NODE_STATE`` shared with ``node``, the rest deep-copied."""
    twin = object.__new__(type(node))
    memo[id(node)] = twin
    for key, value in node.__dict__.items():
        twin.__dict__[key] = value if key in SHARED_NODE_STATE else copy.deepcopy(value, memo)
    return twin


def share_what_requests_only_read() -> bool:
    """Make each request's copy of jina's request graph share what its nodes learnt at start (``_copy_node``);
    False, with a warning, where that jina's graph has no such nodes (each request then copies all of it)."""
    from jina.serve.runtimes.gateway.graph.topology_graph import TopologyGraph

    node_class = getattr(TopologyGraph, "_ReqReplyNode", None)
    if node_class is None or "__deepcopy__" in vars(node_class) and vars(node_class)["__deepcopy__"] is not _copy_node:
        logger.warning("this jina's request graph has no nodes to copy lightly: each request copies all of it")
        return False
    node_class.__deepcopy__ = _copy_node
    return True


class ClipseekGateway(GRPCGateway):
    """jina's ``GRPCGateway`` whose single (unary) requests are routed without a thread hand-off, each request's
    copy of the graph sharing what the executors told the gateway at start."""

    async def setup_server(self):
        if read_single_requests_on_loop(getattr(self, "_request_handler", None)):
            logger.info("ClipseekGateway: single requests are routed on the event loop")
        if share_what_requests_only_read():
            logger.info("ClipseekGateway: each request's copy of the graph shares the executors' endpoints and schemas")
        await super().setup_server()
