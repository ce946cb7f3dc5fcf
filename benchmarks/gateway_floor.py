"""What the framework alone costs a single request: a gRPC flow of executors that do nothing, behind jina's
own gateway and behind ``ClipseekGateway`` (flows/gateway.py), in one run.

    python benchmarks/gateway_floor.py                  # two executors (a text search's hops), 300 requests, 3 turns
    python benchmarks/gateway_floor.py --executors 1,2,3 --requests 500

Each request is what clipseek's client sends for one text query (one ``TextQuery``, ``limit`` in the
parameters) over its open channel (``flows.transport.GrpcTransport``); the first executor sets a 512-d
embedding, the others return the documents as they came. The two gateways take turns (``--turns``), so
that their ratio compares figures of the same minutes on a VM whose speed drifts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import Results, options_of, percentiles, table  # noqa: E402  (sets sys.path and offline env)
from docarray import DocList  # noqa: E402
from jina import Executor, Flow, requests  # noqa: E402
from jina.serve.runtimes.gateway.grpc import GRPCGateway  # noqa: E402

from executors.docs import TextQuery  # noqa: E402
from flows.gateway import ClipseekGateway  # noqa: E402
from flows.serving import free_port  # noqa: E402
from flows.transport import GrpcTransport  # noqa: E402


class Embeds(Executor):
    @requests(on="/search")
    async def search(self, docs: DocList[TextQuery], **kwargs) -> DocList[TextQuery]:
        for doc in docs:
            doc.embedding = np.ones(512, dtype=np.float32)
        return docs


class PassesOn(Executor):
    @requests(on="/search")
    async def search(self, docs: DocList[TextQuery], **kwargs) -> DocList[TextQuery]:
        return docs


GATEWAYS = {"jina GRPCGateway": GRPCGateway, "ClipseekGateway": ClipseekGateway}


def seconds_per_request(gateway, executors: int, count: int, warmup: int = 20):
    port = free_port()
    flow = Flow().config_gateway(uses=gateway, protocol="grpc", port=port, host="127.0.0.1")
    for i in range(executors):
        flow = flow.add(uses=Embeds if i == 0 else PassesOn, name=f"step{i}", host="127.0.0.1")
    transport = GrpcTransport()
    address = f"grpc://127.0.0.1:{port}"

    def one():
        transport.post(address, "/search", DocList[TextQuery]([TextQuery(text="a red car near the sea")]),
                       DocList[TextQuery], {"limit": 10})

    with flow:
        try:
            for _ in range(warmup):
                one()
            out = []
            for _ in range(count):
                t0 = time.perf_counter()
                one()
                out.append(time.perf_counter() - t0)
            return out
        finally:
            transport.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executors", default="2", help="executors in the flow, comma separated (default 2)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per turn (default 300)")
    parser.add_argument("--turns", type=int, default=3, help="turns each gateway takes (default 3)")
    args = parser.parse_args()
    report = Results(__file__, options_of(args))
    rows = []
    for executors in [int(n) for n in args.executors.split(",") if n.strip()]:
        seconds = {name: [] for name in GATEWAYS}
        for _ in range(args.turns):
            for name, gateway in GATEWAYS.items():
                seconds[name] += seconds_per_request(gateway, executors, args.requests)
        (jina50, jina99), (ours50, ours99) = (percentiles(seconds[name]) for name in GATEWAYS)
        rows.append([executors, f"{jina50:.2f} / {jina99:.2f}", f"{ours50:.2f} / {ours99:.2f}", f"{ours50 / jina50:.2f}"])
        print(table(HEADERS, rows[-1:]), flush=True)
    report.table(f"One request through a flow of executors that do nothing, p50 / p99 ms ({args.requests} requests "
                 f"{args.turns} times per gateway, the gateways taking turns)", HEADERS, rows)
    report.write()


HEADERS = ["executors", "jina GRPCGateway", "ClipseekGateway", "ClipseekGateway / jina's"]

if __name__ == "__main__":
    main()
