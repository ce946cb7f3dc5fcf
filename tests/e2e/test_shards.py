"""Scale-out on Jina's engine: 2 indexer shards answer exactly what 1 shard answers on the same data."""

import os

import pytest


from clipseek.demo import world
from clipseek.client import ClipseekClient
from flows.serving import INDEX_FLOW, SEARCH_FLOW, flow_config, flows_in_subprocess, free_port
from flows.settings import Settings


def test_flow_yamls_declare_replicas_and_shards():
    for path in (INDEX_FLOW, SEARCH_FLOW):
        config = flow_config(path, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=3)
        *encoders, indexer = config["executors"]
        assert all(e["replicas"] == 1 for e in encoders) and indexer["shards"] == 3
        assert os.path.isabs(indexer["uses_after"]) and indexer["uses_after"].endswith("shard_merger.yml")
        # one shard has nothing to merge: no head, no merger, two hops less per request
        single = flow_config(path, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=1)
        indexer = single["executors"][-1]
        assert indexer["shards"] == 1 and "uses_after" not in indexer and "polling" not in indexer


def test_two_shards_give_the_same_top_k_as_one(tiny_model, tmp_path):
    folder = str(tmp_path / "pictures")
    world.write_world(folder, n=30, seed=11)
    queries = ["a red circle", "two blue squares", "a large green heart on a black background"]
    answers, counts = {}, {}
    for shards in (1, 2):
        settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                            device="cpu", dtype="float32", workspace=str(tmp_path / f"ws{shards}"), shards=shards)
        # one precision for both runs: auto measures at each start and may pick differently under load
        with flows_in_subprocess(settings):
            client = ClipseekClient(settings.index_address, settings.search_address)
            report = client.index([folder], batch_size=4)  # 8 requests, spread over the shards
            assert len(report.indexed) == 30
            answers[shards] = [[(h.id, round(h.score, 5)) for h in hits] for hits in client.search_many(queries, limit=7)]
            counts[shards] = client.status().count
            assert client.index([folder]).unchanged and not client.index([folder]).indexed  # lookups see every shard
    assert counts == {1: 30, 2: 30}
    assert answers[2] == answers[1]
    shard_dirs = sorted(os.listdir(tmp_path / "ws2" / "SimpleIndexer"))
    assert shard_dirs == ["0", "1"]
    from executors.store.vector_store import VectorStore

    per_shard = [VectorStore(str(tmp_path / "ws2" / "SimpleIndexer" / d)).count for d in shard_dirs]
    assert sum(per_shard) == 30 and min(per_shard) > 0, per_shard  # both shards hold part of the index


def test_two_shards_keep_each_picture_once_and_refuse_another_layout(tiny_model, tmp_path):
    """Re-indexed pictures land on the shard their id hashes to, whatever the request order: 24 files
    indexed one request each, all rewritten, one added, all indexed again: 25 entries, not 49."""
    from PIL import Image

    folder = tmp_path / "pictures"
    world.write_world(str(folder), n=24, seed=5)
    workspace = str(tmp_path / "ws")
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=workspace, shards=2)
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        files = sorted(str(p) for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
        for path in files:
            assert client.index([path]).indexed
        for i, path in enumerate(files):  # every picture changes
            Image.open(path).convert("RGB").rotate(90 + i).save(path)
        Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "new.png")
        for path in [*files, str(folder / "new.png")]:
            assert client.index([path]).indexed
        assert client.status().count == 25
        ids = [d.id for d in client.documents()]
        assert len(ids) == len(set(ids)) == 25
        assert client.delete(ids[:3]) == 3 and client.status().count == 22
    settings.shards, settings.index_port, settings.search_port = 3, free_port(), free_port()
    with pytest.raises(RuntimeError, match=r"written by 2 shard\(s\); these flows run 3. Start with --shards 2"):
        with flows_in_subprocess(settings, timeout=120):
            pass
