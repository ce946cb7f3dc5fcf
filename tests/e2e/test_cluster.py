"""The exported topology run by jina on one machine: the search flow's indexer shards are the index flow's
shard processes, reached as external executors over gRPC on 127.0.0.1 (flows/cluster.py)."""

import os
import re

import pytest
from docarray import DocList

from clipseek.client import ClipseekClient
from clipseek.demo import world
from executors.docs import ImageInput, IndexStatus, KeyDoc
from flows.cluster import external_names, shared_search_config
from flows.serving import SEARCH_FLOW, flow_config, free_port
from flows.settings import Settings
from flows.transport import GrpcTransport, TransportError


def test_two_flows_one_process_per_shard(tiny_model, tmp_path):
    from flows.cluster import shared_flows_in_subprocess
    from executors.store.vector_store import VectorStore

    folder = tmp_path / "pictures"
    world.write_world(str(folder), n=30, seed=11)
    workspace = tmp_path / "ws"
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(workspace), shards=2)
    with shared_flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        reader = ClipseekClient(settings.search_address, settings.search_address)  # reads through the search flow
        assert len(client.index([str(folder)], batch_size=4).indexed) == 30
        index_status, search_status = client.status(), reader.status()
        assert index_status.count == search_status.count == 30
        assert search_status.path == index_status.path  # the same shard files, answered by the same processes
        assert len(search_status.path.split(";")) == 2

        # the search flow's merger keeps the global top-k of both shards
        everything = client.search("a red circle", limit=30)
        assert len({h.id for h in everything}) == 30
        scores = [h.score for h in everything]
        assert scores == sorted(scores, reverse=True)
        for limit in (1, 5, 12):
            assert [h.id for h in client.search("a red circle", limit=limit)] == [h.id for h in everything[:limit]]
        ids = sorted(d.id for d in reader.documents(page=7))  # /list pages merged across shards
        assert ids == sorted(h.id for h in everything)
        assert all(d.found for d in reader.lookup(ids[:4]))

        # what the index flow writes, the search flow reads at once: there is no second copy to catch up
        extra = tmp_path / "extra"
        world.write_world(str(extra), n=1, seed=99)
        assert len(client.index([str(extra)]).indexed) == 1
        assert reader.status().count == 31 and len(client.search("a red circle", limit=31)) == 31

        # the search flow writes nothing, whichever executors a request names
        transport = GrpcTransport()
        writes = (("/index", DocList[ImageInput]([ImageInput(url=str(next(folder.iterdir())))]), DocList[ImageInput]),
                  ("/delete", DocList[KeyDoc]([KeyDoc(id=ids[0])]), DocList[KeyDoc]),
                  ("/update", DocList[ImageInput]([ImageInput(id=ids[0], tags={"x": 1})]), DocList[ImageInput]),
                  ("/clear", DocList[IndexStatus](), DocList[IndexStatus]))
        for endpoint, docs, kind in writes:
            for target in (None, "indexer_0", "^indexer"):
                with pytest.raises(TransportError, match=re.escape(f"{endpoint} is refused here")):
                    transport.post(settings.search_address, endpoint, docs, kind, target_executor=target)
        from jina import Client  # jina's own client streams its requests

        with pytest.raises(Exception, match=re.escape("/clear is refused here")):
            Client(host=settings.search_address).post("/clear", DocList[IndexStatus](), return_type=DocList[IndexStatus])
        assert reader.status().count == client.status().count == 31
        assert reader.search("a red circle", limit=3)  # and it still answers reads
        transport.close()
    shard_dirs = sorted(os.listdir(workspace / "SimpleIndexer"))
    assert shard_dirs == ["0", "1"]
    per_shard = [VectorStore(str(workspace / "SimpleIndexer" / d), read_only=True).count for d in shard_dirs]
    assert sum(per_shard) == 31 and min(per_shard) > 0, per_shard


def test_the_search_flow_needs_as_many_shards_as_the_index_flow():
    config = flow_config(SEARCH_FLOW, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=2)
    with pytest.raises(ValueError, match="must run the same number of shards"):
        shared_search_config(config, [("127.0.0.1", 1)])
    shared = shared_search_config(config, [("127.0.0.1", 1), ("127.0.0.1", 2)])
    *_, first, second, merger = shared["executors"]
    assert [first["name"], second["name"]] == external_names(2) and first["external"] and first["port"] == 1
    assert merger["name"] == "indexer" and merger["needs"] == external_names(2) and merger["no_reduce"]
    assert merger["uses"].endswith("shard_merger.yml") and merger["uses_with"] == {"limit": 10}
    assert shared["gateway"]["uses"].endswith("read_only_gateway.yml")
