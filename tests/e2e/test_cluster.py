"""The exported topology run by jina on one machine: the search flow's indexer shards are the index flow's
shard processes, reached as external executors over gRPC on 127.0.0.1 (flows/cluster.py)."""

import os
import re
import signal

import pytest
from docarray import DocList

from clipseek.client import ClipseekClient, ClipseekError
from clipseek.demo import world
from executors.docs import ImageInput, IndexStatus, KeyDoc, TextQuery
from executors.simple_indexer import shard_of
from flows.cluster import external_names, shared_search_config
from flows.serving import SEARCH_FLOW, flow_config, free_port
from flows.settings import Settings
from flows.transport import GrpcTransport, TransportError
from tests.e2e.test_shards import _processes_using


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

        # liked and disliked pictures on both shards: every shard searches with the vector of all of them, so the
        # answer is the exact top-k over the whole index (computed here from the shards' own files)
        liked = [next(i for i in ids if shard_of(i, 2) == k) for k in (0, 1)]
        disliked = [next(i for i in reversed(ids) if shard_of(i, 2) == k) for k in (0, 1)]
        expected = _feedback_top_k(workspace, liked, disliked, 0.75, 0.25, limit=8)
        assert [h.id for h in reader.search(like=liked, unlike=disliked, limit=8)] == expected
        found = Client(host=settings.search_address).post("/search", DocList[TextQuery]([TextQuery()]),
                                                          parameters={"like": liked, "unlike": disliked, "limit": 8},
                                                          return_type=DocList[TextQuery])
        assert [h.id for h in found[0].matches] == expected  # a plain jina client names the ids alone

        # a shard whose executor fails makes both flows answer an error naming it, not the other shard's half
        shard = workspace / "SimpleIndexer" / "1"
        shard.rename(shard.with_name("1.moved"))
        try:
            for flow in (client, reader):
                with pytest.raises(ClipseekError, match=r"indexer shard 1 of 2 failed \(FileNotFoundError.*partial"):
                    flow.status()
        finally:
            shard.with_name("1.moved").rename(shard)
        assert reader.status().count == 31

        # a shard that is down: both flows answer an error naming it (the search flow's gateway cannot reach it)
        (victim,) = _processes_using(shard)
        os.kill(victim, signal.SIGKILL)
        down = r"indexer shard 1 of 2 did not answer .*partial"
        for call in (client.status, reader.status, lambda: reader.search("a red circle"),
                     lambda: list(reader.documents()), lambda: reader.search(like=liked)):
            with pytest.raises(ClipseekError, match=down):
                call()
        with pytest.raises(Exception, match="indexer_1"):
            Client(host=settings.search_address).post("/status", DocList[IndexStatus](), return_type=DocList[IndexStatus])
    shard_dirs = sorted(os.listdir(workspace / "SimpleIndexer"))
    assert shard_dirs == ["0", "1"]
    per_shard = [VectorStore(str(workspace / "SimpleIndexer" / d), read_only=True).count for d in shard_dirs]
    assert sum(per_shard) == 31 and min(per_shard) > 0, per_shard


def _feedback_top_k(workspace, liked, disliked, like_weight, unlike_weight, limit):
    """The ids of the exact top ``limit`` of a search by liked and disliked pictures alone over every shard's
    vectors, disliked ones left out (as SimpleIndexer._query_vector builds it)."""
    import numpy as np

    from executors.store.vector_store import VectorStore

    vectors = {}
    for folder in sorted((workspace / "SimpleIndexer").iterdir()):
        store = VectorStore(str(folder), read_only=True)
        try:
            vectors.update(store.vectors([r.id for _, r in store.iter_records()]))
        finally:
            store.close()

    def unit(v):
        return v / np.linalg.norm(v)

    query = unit(like_weight * unit(np.mean([vectors[i] for i in liked], axis=0))
                 - unlike_weight * unit(np.mean([vectors[i] for i in disliked], axis=0)))
    scores = {i: float(unit(v) @ query) for i, v in vectors.items() if i not in disliked}
    return sorted(scores, key=lambda i: (-scores[i], i))[:limit]


def test_the_search_flow_needs_as_many_shards_as_the_index_flow():
    config = flow_config(SEARCH_FLOW, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=2)
    with pytest.raises(ValueError, match="must run the same number of shards"):
        shared_search_config(config, [("127.0.0.1", 1)])
    shared = shared_search_config(config, [("127.0.0.1", 1), ("127.0.0.1", 2)])
    *_, first, second, merger = shared["executors"]
    assert [first["name"], second["name"]] == external_names(2) and first["external"] and first["port"] == 1
    assert merger["name"] == "indexer" and merger["needs"] == external_names(2) and merger["no_reduce"]
    assert merger["uses"].endswith("shard_merger.yml") and merger["uses_with"] == {"limit": 10, "shards": 2}
    assert shared["gateway"]["uses"].endswith("read_only_gateway.yml")
