"""The ShardMerger refuses to pass on a partial answer: every shard marks its answer, and a shard that failed
or never answered is named in an error (executors/shard_merger.py)."""

import numpy as np
import pytest
from docarray import DocList

from executors.docs import Hit, IndexStatus, KeyDoc, QueryPart, TextQuery
from executors.params import RequestError
from executors.shard_merger import ShardError, ShardMerger, mark_answer


def _status(shard, count, error=None):
    answer = None if error else DocList[IndexStatus]([IndexStatus(count=count, path=f"/ws/{shard}")])
    return mark_answer(answer, DocList[IndexStatus], shard, 2, error)


def test_whole_answers_are_merged_without_their_marks():
    merger = ShardMerger(shards=2)
    (status,) = merger.status(docs=DocList[IndexStatus](), docs_matrix=[_status(0, 3), _status(1, 4)])
    assert status.count == 7 and status.path == "/ws/0;/ws/1"
    pages = [mark_answer(DocList[KeyDoc]([KeyDoc(id=i, found=True) for i in ids]), DocList[KeyDoc], k, 2)
             for k, ids in enumerate((["b", "d"], ["a", "c"]))]
    assert [d.id for d in merger.list_documents(docs=DocList[KeyDoc](), docs_matrix=pages)] == ["a", "b", "c", "d"]


def test_a_shard_that_raised_or_did_not_answer_is_named():
    merger = ShardMerger(shards=2)
    with pytest.raises(ShardError, match=r"indexer shard 1 of 2 failed \(FileNotFoundError: gone\).*partial"):
        merger.status(docs=DocList[IndexStatus](), docs_matrix=[_status(0, 3), _status(1, 0, FileNotFoundError("gone"))])
    # jina's head drops a shard it cannot reach, and hands on a raised shard's request as it was sent (no mark)
    for answers in ([_status(0, 3)], [_status(0, 3), DocList[IndexStatus]()]):
        with pytest.raises(ShardError, match=r"/status: indexer shard 1 of 2 did not answer.*partial"):
            merger.status(docs=DocList[IndexStatus](), docs_matrix=answers)
    sent = DocList[KeyDoc]([KeyDoc(id="x")])
    with pytest.raises(ShardError, match="/lookup: indexer shard 0 of 2 did not answer"):
        merger.lookup(docs=sent, docs_matrix=[sent, mark_answer(sent, DocList[KeyDoc], 1, 2)])


def test_an_error_every_shard_raised_is_answered_as_one_shard_would():
    merger = ShardMerger(shards=2)
    refused = [mark_answer(None, DocList[KeyDoc], k, 2, RequestError("parameter 'ids': bad")) for k in range(2)]
    with pytest.raises(RequestError, match=r"^parameter 'ids': bad$"):
        merger.delete(docs=DocList[KeyDoc](), docs_matrix=refused)


def test_a_query_some_shards_refused_is_an_error_and_one_all_refused_is_its_answer():
    merger = ShardMerger(shards=2)

    def answer(shard, error=None):
        query = TextQuery(text="cat", error=error, matches=DocList[Hit]([Hit(id=f"h{shard}", score=0.5 + shard)]))
        return mark_answer(DocList[TextQuery]([query]), DocList[TextQuery], shard, 2)

    with pytest.raises(ShardError, match=r"query 1 \('cat'\): indexer shard 1 of 2: broken.*partial"):
        merger.search(docs=DocList[TextQuery](), docs_matrix=[answer(0), answer(1, "broken")])
    (query,) = merger.search(docs=DocList[TextQuery](), docs_matrix=[answer(0, "empty"), answer(1, "empty")])
    assert query.error == "empty"
    (query,) = merger.search(docs=DocList[TextQuery](), docs_matrix=[answer(0), answer(1)])
    assert [m.id for m in query.matches] == ["h1", "h0"] and query.error is None


def test_vectors_come_from_the_shard_that_holds_each_id():
    merger = ShardMerger(shards=2)

    def answer(shard, held):
        parts = [QueryPart(id=i, embedding=np.full(4, float(shard)) if i in held else None) for i in ("a", "b", "c")]
        return mark_answer(DocList[QueryPart](parts), DocList[QueryPart], shard, 2)

    merged = merger.vectors(docs=DocList[QueryPart](), docs_matrix=[answer(0, {"b"}), answer(1, {"a"})])
    assert [d.id for d in merged] == ["a", "b", "c"]
    assert [None if d.embedding is None else float(d.embedding[0]) for d in merged] == [1.0, 0.0, None]


def test_shards_started_for_another_count_are_refused():
    with pytest.raises(ShardError, match="this merger expects 3 shards"):
        ShardMerger(shards=3).status(docs=DocList[IndexStatus](), docs_matrix=[_status(0, 1), _status(1, 1)])


def _sharded_indexer(tmp_path, shard=1, shards=2):
    from executors.simple_indexer import SimpleIndexer

    return SimpleIndexer(index_dir=str(tmp_path / f"shard{shard}"), runtime_args={"shard_id": shard, "shards": shards})


def _call(indexer, endpoint, docs, parameters=None):
    import asyncio

    return asyncio.run(indexer.__acall__(endpoint, docs=docs, parameters=parameters or {}, docs_matrix=None,
                                         docs_map=None, tracing_context=None))


def test_a_shard_marks_its_answers_and_hands_on_what_it_raised(tmp_path):
    from executors.shard_merger import _unmarked

    indexer = _sharded_indexer(tmp_path)
    try:
        kept, mark = _unmarked(_call(indexer, "/status", DocList[IndexStatus]()))
        assert (mark.shard, mark.shards, mark.error) == (1, 2, None) and kept[0].count == 0
        kept, mark = _unmarked(_call(indexer, "/delete", DocList[KeyDoc](), {"ids": {"$gt": ""}}))
        assert not len(kept) and mark.kind == "RequestError" and "ids must be a list of document ids" in mark.error
    finally:
        indexer.close()


def test_every_shard_searches_with_the_vectors_a_search_sends_for_liked_ids(tmp_path):
    from executors.docs import ImageInput
    from executors.simple_indexer import SimpleIndexer

    indexer = SimpleIndexer(index_dir=str(tmp_path / "index"))
    try:
        vectors = {"a": [1.0, 0.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0, 0.0], "c": [0.6, 0.8, 0.0, 0.0]}
        indexer.index(DocList[ImageInput]([ImageInput(id=i, uri=f"/{i}.png", embedding=np.array(v, dtype=np.float32))
                                           for i, v in vectors.items() if i != "c"]))  # "c" is on another shard

        def search(parameters):
            (query,) = indexer.search(DocList[TextQuery]([TextQuery()]), parameters=parameters)
            return query

        assert "not in the index: c" in search({"like": ["c"]}).error
        query = search({"like": ["c"], "feedback_vectors": {"c": vectors["c"], "zzz": [1, 2]}})  # others ignored
        assert query.error is None and [m.id for m in query.matches] == ["b", "a"]  # nearest to c first
        for bad in ({"c": [1.0, 2.0]}, {"c": [float("nan")] * 4}, {"c": "x"}, ["c"]):
            assert "feedback_vectors" in search({"like": ["c"], "feedback_vectors": bad}).error
        (part,) = indexer.vectors(DocList[QueryPart]([QueryPart(id="b")]))
        assert list(part.embedding) == vectors["b"]
        assert indexer.vectors(DocList[QueryPart]([QueryPart(id="c")]))[0].embedding is None  # not on this shard
    finally:
        indexer.close()


def test_every_document_gets_lists_of_its_own_typed_as_declared():
    from executors.docs import DuplicateGroup, Hit, ImageInput, QueryPart, TextQuery, VideoMoment

    a, b = TextQuery(text="a"), TextQuery(text="b")
    a.matches.append(Hit(uri="/x.jpg"))
    a.parts.append(QueryPart(text="c"))
    assert len(b.matches) == 0 and len(b.parts) == 0 and len(TextQuery().matches) == 0
    assert a.matches.doc_type is Hit and b.parts.doc_type is QueryPart
    assert ImageInput().moments.doc_type is VideoMoment and DuplicateGroup().members.doc_type is Hit
    back = DocList[TextQuery].from_protobuf(DocList[TextQuery]([a, b]).to_protobuf())
    assert [len(q.matches) for q in back] == [1, 0] and back[0].matches[0].uri == "/x.jpg"
