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
"""

from __future__ import annotations

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


class ClipseekGateway(GRPCGateway):
    """jina's ``GRPCGateway`` whose single (unary) requests are routed without a thread hand-off."""

    async def setup_server(self):
        if read_single_requests_on_loop(getattr(self, "_request_handler", None)):
            logger.info("ClipseekGateway: single requests are routed on the event loop")
        await super().setup_server()
