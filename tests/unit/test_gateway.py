"""ClipseekGateway: a single request through jina's own RequestStreamer, with and without thread hand-offs; each
request's copy of the request graph."""

import asyncio
import concurrent.futures
import copy
import logging
import types

import pytest
from jina.serve.stream import RequestStreamer

from executors.docs import TextQuery
from flows.gateway import SHARED_NODE_STATE, read_single_requests_on_loop, share_what_requests_only_read


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, counting what is handed to its threads."""

    def __init__(self):
        super().__init__(max_workers=1)
        self.handed = 0

    def submit(self, fn, /, *args, **kwargs):
        self.handed += 1
        return super().submit(fn, *args, **kwargs)


def _answer(streamer: RequestStreamer, request):
    """``process_single_data`` as the gateway calls it for a unary request: (the answer, thread hand-offs)."""
    pool = CountingPool()

    async def main():
        asyncio.get_running_loop().set_default_executor(pool)
        return await streamer.process_single_data(request)

    try:
        return asyncio.run(main()), pool.handed
    finally:
        pool.shutdown()


def _streamer() -> RequestStreamer:
    def handle(request, return_type=None):  # what the gateway's graph does: a future of the executors' answer
        done = asyncio.get_running_loop().create_future()
        done.set_result(("answer", request))
        return done, None

    return RequestStreamer(request_handler=handle, result_handler=lambda result: result)


def test_jina_hands_a_single_request_to_a_thread_and_clipseek_gateway_does_not():
    request = object()
    as_jina = _streamer()
    answer, handed = _answer(as_jina, request)
    assert answer == ("answer", request)
    assert handed >= 1  # jina's default: the one-item iterator is read in a thread

    ours = _streamer()
    assert read_single_requests_on_loop(types.SimpleNamespace(streamer=types.SimpleNamespace(_streamer=ours)))
    answer, handed = _answer(ours, request)
    assert answer == ("answer", request) and handed == 0


def test_a_jina_without_the_streamer_keeps_its_gateway_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="flows.gateway"):
        assert read_single_requests_on_loop(types.SimpleNamespace(streamer=object())) is False
        assert read_single_requests_on_loop(None) is False
    assert "keep their thread hand-offs" in caplog.text


@pytest.fixture
def light_node_copies():
    """``share_what_requests_only_read`` applied for one test, and taken back after it."""
    from jina.serve.runtimes.gateway.graph.topology_graph import TopologyGraph

    node_class = TopologyGraph._ReqReplyNode
    assert "__deepcopy__" not in vars(node_class)
    assert share_what_requests_only_read()
    yield node_class
    del node_class.__deepcopy__


def _search_graph():
    """The request graph of a text search, as a gateway holds it once the executors told it their endpoints."""
    from jina.proto import jina_pb2
    from jina.serve.runtimes.gateway.graph.topology_graph import TopologyGraph

    graph = TopologyGraph({"start-gateway": ["text_encoder"], "text_encoder": ["indexer"], "indexer": ["end-gateway"]})
    for node in graph.all_nodes:
        proto = jina_pb2.EndpointsProto()
        proto.endpoints.extend(["/search", "/status"])
        proto.schemas.update({"/search": {"input": {"name": "TextQuery", "model": {"properties": {"text": {}}}}}})
        node.endpoints, node._endpoints_proto = proto.endpoints, (proto, None)
        node._pydantic_models_by_endpoint = {"/search": {"input": TextQuery, "output": TextQuery}}
    return graph


def test_a_requests_graph_shares_what_the_executors_told_the_gateway_and_owns_its_own_state(light_node_copies):
    graph = _search_graph()
    first, second = copy.deepcopy(graph), copy.deepcopy(graph)
    for request_graph in (first, second):
        for mine, original in zip(_in_order(request_graph), _in_order(graph)):
            assert mine is not original and mine.name == original.name and type(mine) is type(original)
            for shared in SHARED_NODE_STATE:  # learnt once at start, never changed by a request
                assert getattr(mine, shared) is getattr(original, shared)
            assert mine.parts_to_send is not original.parts_to_send and mine.parts_to_send == []
    # each request's nodes point to that request's own next nodes, and what one request does stays its own
    encoder, indexer = _in_order(first)[:2]
    assert encoder.outgoing_nodes == [indexer]
    encoder.parts_to_send.append("a request")
    encoder.status = "done"
    assert _in_order(second)[0].parts_to_send == [] and _in_order(second)[0].status is None
    assert _in_order(graph)[0].parts_to_send == [] and _in_order(graph)[0].status is None


def test_without_light_copies_a_request_copies_what_the_executors_told_the_gateway():
    graph = _search_graph()
    mine, original = _in_order(copy.deepcopy(graph))[0], _in_order(graph)[0]
    assert mine._endpoints_proto is not original._endpoints_proto  # jina's own behaviour, which the fixture changes


def _in_order(graph):
    """The graph's nodes from its origin along the first outgoing edge: text_encoder, indexer, the end node."""
    nodes, node = [], graph.origin_nodes[0]
    while node is not None:
        nodes.append(node)
        node = node.outgoing_nodes[0] if node.outgoing_nodes else None
    return nodes
