"""Scale-out on Jina's engine: 2 indexer shards answer exactly what 1 shard answers on the same data."""

import os
import re
import signal

import pytest
from docarray import DocList
from jina import Client

from clipseek.demo import world
from clipseek.client import ClipseekClient, ClipseekError, expand_sources
from executors.docs import IndexStatus, TextQuery
from executors.images.imaging import uri_id
from executors.simple_indexer import shard_of
from flows.serving import INDEX_FLOW, SEARCH_FLOW, flow_config, flows_in_subprocess, free_port, with_gateway
from flows.settings import Settings


def _ranked(hits):
    return [(h.id, round(h.score, 5)) for h in hits]


TIE = 2e-5  # two pictures this close in score may come in either order: one shard's scan and two shards' scans
            # add up the same dot products in another order (float32), which can swap a near-tie


def assert_same_ranking(got, want):
    """Each answer list gives the same scores, position by position, and the same ids in the same order,
    except within a run of near-equal scores (``TIE``); a run that reaches the list's end may hold another
    id with that score (the one past the cut)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w), (g, w)
        assert all(abs(a[1] - b[1]) <= TIE for a, b in zip(g, w)), (g, w)
        start = 0
        for end in range(1, len(w) + 1):
            if end == len(w) or w[end - 1][1] - w[end][1] > TIE:  # a run of ties ends at ``end``
                ids_g, ids_w = {i for i, _ in g[start:end]}, {i for i, _ in w[start:end]}
                assert ids_g == ids_w or end == len(w), (g, w)
                start = end


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
    # with several shards the search flow's gateway fetches the vectors of liked ids from every shard first
    sharded = flow_config(SEARCH_FLOW, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=2)
    assert with_gateway(sharded, search=True)["gateway"] == {"uses": "FeedbackGateway", "py_modules": ["flows.cluster"]}
    # every other flow (one shard, or the index flow) runs ClipseekGateway: single requests without thread hand-offs
    single = flow_config(SEARCH_FLOW, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=1)
    assert with_gateway(single, search=True)["gateway"] == {"uses": "ClipseekGateway", "py_modules": ["flows.gateway"]}
    sharded_index = flow_config(INDEX_FLOW, host="127.0.0.1", port=1, workspace="/tmp/x", encoder_options={}, shards=2)
    assert with_gateway(sharded_index)["gateway"] == {"uses": "ClipseekGateway", "py_modules": ["flows.gateway"]}


def test_two_shards_give_the_same_top_k_as_one(tiny_model, tmp_path):
    folder = str(tmp_path / "pictures")
    world.write_world(folder, n=30, seed=11)
    queries = ["a red circle", "two blue squares", "a large green heart on a black background"]
    answers, counts, feedback = {}, {}, {}
    ids = sorted(uri_id(p) for p in expand_sources([folder]))
    # liked and disliked pictures on both shards, so that each shard holds some of the ids and not others
    liked = [next(i for i in ids if shard_of(i, 2) == k) for k in (0, 1)]
    liked.append(next(i for i in ids[5:] if i not in liked))
    disliked = [next(i for i in reversed(ids) if shard_of(i, 2) == k) for k in (1, 0)]
    assert {shard_of(i, 2) for i in liked} == {shard_of(i, 2) for i in disliked} == {0, 1}
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
            feedback[shards] = [
                _ranked(client.search("a red circle", like=liked, unlike=disliked, limit=9)),
                _ranked(client.search(like=liked[:2], limit=9)),  # "more like these" alone
                _ranked(client.search("two blue squares", unlike=disliked, weights={"unlike_weight": 0.6}, limit=9)),
                # a plain jina Client names the ids alone: the search flow fetches their vectors itself
                _ranked(Client(host=settings.search_address).post(
                    "/search", DocList[TextQuery]([TextQuery(text="a red circle")]), return_type=DocList[TextQuery],
                    parameters={"like": liked, "unlike": disliked, "limit": 9})[0].matches),
            ]
    assert counts == {1: 30, 2: 30}
    assert_same_ranking(answers[2], answers[1])
    assert_same_ranking(feedback[2], feedback[1])
    assert feedback[1][3] == feedback[1][0]  # one flow, one scan: a plain jina Client gets the very same answer
    # a disliked id is left out of every answer that names it as disliked ("more like these" alone does not)
    assert not set(disliked) & {i for k in (0, 2, 3) for i, _ in feedback[1][k]}
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


def _processes_using(folder):
    """The pids of the processes (this one left out) with a file under ``folder`` open: a shard's processes."""
    folder = os.path.realpath(folder)
    pids = set()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(folder + os.sep):
                pids.add(int(name))
                break
    return pids - {os.getpid()}


def test_a_failing_shard_answers_an_error_not_part_of_the_answer(tiny_model, tmp_path):
    """jina's head merges the shards that answered: a shard whose executor raised, or that is down, must
    make the request an error that names it, on every endpoint, for ClipseekClient and a plain jina Client."""
    folder = tmp_path / "pictures"
    world.write_world(str(folder), n=12, seed=3)
    workspace = tmp_path / "ws"
    shard = workspace / "SimpleIndexer" / "1"
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(workspace), shards=2)
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        assert len(client.index([str(folder)]).indexed) == 12
        ids = sorted(d.id for d in client.documents())
        assert len(ids) == 12 and client.status().count == 12

        # shard 1's executor raises: its folder is gone (the search flow's shard maps its vectors at its first search)
        moved = shard.with_name("1.moved")
        shard.rename(moved)
        try:
            failed = r"indexer shard 1 of 2 failed \(FileNotFoundError: .*partial"
            with pytest.raises(ClipseekError, match=r"/status failed: /status: " + failed):
                client.status()
            with pytest.raises(ClipseekError, match=r"/search failed: /search: " + failed):
                client.search("a red circle")
            with pytest.raises(Exception, match=r"indexer shard 1 of 2 failed \(FileNotFoundError"):
                Client(host=settings.index_address).post("/status", DocList[IndexStatus](),
                                                         return_type=DocList[IndexStatus])
        finally:
            moved.rename(shard)
        assert client.status().count == 12 and len(client.search("a red circle", limit=12)) == 12  # whole again

        # shard 1 is down: its process in each flow is gone
        victims = _processes_using(shard)
        assert len(victims) == 2, victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        down = r"indexer shard 1 of 2 did not answer \(down.*partial"
        calls = {"/search": lambda: client.search("a red circle"), "/status": client.status,
                 "/lookup": lambda: client.lookup(ids[:3]), "/list": lambda: list(client.documents()),
                 "/delete": lambda: client.delete(ids[:1]), "/index": lambda: client.index([str(folder)], force=True)}
        for endpoint, call in calls.items():
            with pytest.raises(ClipseekError, match=re.escape(endpoint) + r" failed: .*" + down):
                call()
        with pytest.raises(Exception, match=down):
            Client(host=settings.search_address).post("/search", DocList[TextQuery]([TextQuery(text="a red circle")]),
                                                      return_type=DocList[TextQuery])
