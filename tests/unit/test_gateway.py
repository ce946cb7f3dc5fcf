"""ClipseekGateway: a single request through jina's own RequestStreamer, with and without thread hand-offs."""

import asyncio
import concurrent.futures
import logging
import types

from jina.serve.stream import RequestStreamer

from flows.gateway import read_single_requests_on_loop


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
