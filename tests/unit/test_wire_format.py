"""The schemas' protobuf codec (executors/docs.py FastProto) writes docarray's own bytes and reads them back
as docarray does: a plain docarray reader (any jina Client) and clipseek's executors see the same documents."""

from typing import Any, Dict, Optional

import numpy as np
import pytest
from docarray import BaseDoc, DocList
from docarray.base_doc.mixins.io import IOMixin

from executors.docs import (DuplicateGroup, Hit, ImageInput, IndexStatus, KeyDoc, QueryPart, TextQuery,
                            VideoMoment)


def _hit(i: int) -> Hit:
    return Hit(id=f"id-{i}", uri=f"/photos/{i}.jpg", score=0.5 + i / 100, tags={"album": "x", "n": i, "ok": True,
                                                                                "nested": {"a": [1, 2.5, "b"]}},
               width=640, height=None, mtime=1.7e9 + i, size=1234, taken=None, camera="Pixel", t=12.5)


def _samples():
    query = TextQuery(id="q1", text="a black cat", url="file:///tmp/cat.jpg", embedding=np.arange(8, dtype=np.float32),
                      embedding_model="m", error=None,
                      parts=DocList[QueryPart]([QueryPart(text="snow", weight=-0.5), QueryPart(
                          bytes_=b"\x89PNG\r\n", tensor=np.zeros((2, 2, 3), dtype=np.uint8), weight=2.0)]),
                      matches=DocList[Hit]([_hit(i) for i in range(3)]))
    image = ImageInput(id="img", url="https://example.org/a.png", uri="a.png", bytes_=b"abc", tags={"k": "v"},
                       content_hash="ff00", mtime=1.5, size=3, width=1, height=2, status="indexed",
                       moments=DocList[VideoMoment]([VideoMoment(t=1.0, embedding=np.ones(4, dtype=np.float32))]))
    return [query, image, _hit(7), KeyDoc(id="k", uri="u", found=True, size=0, t=None),
            IndexStatus(count=3, dim=512, model="m", bytes_on_disk=10, schema_version=2),
            DuplicateGroup(members=DocList[Hit]([_hit(1), _hit(2)]))]


@pytest.mark.parametrize("doc", _samples(), ids=lambda d: type(d).__name__)
def test_writes_docarrays_own_bytes(doc):
    ours = doc.to_protobuf().SerializeToString(deterministic=True)
    docarrays = IOMixin.to_protobuf(doc).SerializeToString(deterministic=True)
    assert ours == docarrays


def _plain(doc: BaseDoc) -> Dict[str, Any]:
    out = {}
    for name, value in doc:
        if isinstance(value, DocList):
            out[name] = [_plain(d) for d in value]
        elif isinstance(value, BaseDoc):
            out[name] = _plain(value)
        elif isinstance(value, np.ndarray):
            out[name] = (value.dtype.str, value.shape, value.tobytes())
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("doc", _samples(), ids=lambda d: type(d).__name__)
def test_reads_back_what_it_wrote(doc):
    again = type(doc).from_protobuf(doc.to_protobuf())
    assert _plain(again) == _plain(doc)
    assert type(again.id).__name__ == "ID"


class PlainHit(BaseDoc):
    """A client's own schema, with docarray's codec only."""

    uri: Optional[str] = None
    score: float = 0.0
    tags: Dict[str, Any] = {}
    width: Optional[int] = None
    t: Optional[float] = None


class PlainQuery(BaseDoc):
    text: Optional[str] = None
    matches: DocList[PlainHit] = DocList[PlainHit]()


def test_a_plain_docarray_reader_reads_an_answer():
    answer = _samples()[0]
    seen = PlainQuery.from_protobuf(answer.to_protobuf())
    assert seen.text == "a black cat"
    assert [(h.id, h.uri, h.score, h.width, h.t, h.tags) for h in seen.matches] == \
        [(h.id, h.uri, h.score, h.width, h.t, h.tags) for h in answer.matches]


def test_reads_what_a_plain_docarray_writer_wrote():
    plain = PlainQuery(id="p", text="dog", matches=DocList[PlainHit]([PlainHit(id="h", uri="u", score=0.25,
                                                                               tags={"a": 1})]))
    seen = TextQuery.from_protobuf(IOMixin.to_protobuf(plain))
    assert (seen.id, seen.text) == ("p", "dog")
    assert [(h.id, h.uri, h.score, h.tags, h.width) for h in seen.matches] == [("h", "u", 0.25, {"a": 1}, None)]


def test_a_field_it_cannot_write_is_named():
    hit = _hit(0)
    object.__setattr__(hit, "tags", {"bad": object()})
    with pytest.raises(ValueError, match="tags"):
        hit.to_protobuf()


class OddQuery(BaseDoc):
    """A sender's schema with a field TextQuery does not have, and one whose type it does not take."""

    text: Optional[str] = None
    unknown_field: Optional[PlainHit] = None  # a nested document: reading it would need a type for it


def test_fields_the_schema_does_not_have_are_skipped_as_docarray_skips_them():
    sent = IOMixin.to_protobuf(OddQuery(id="o", text="cat", unknown_field=PlainHit(uri="x" * 1000)))
    ours, docarrays = TextQuery.from_protobuf(sent), IOMixin.from_protobuf.__func__(TextQuery, sent)
    assert (ours.id, ours.text) == (docarrays.id, docarrays.text) == ("o", "cat")
    assert not hasattr(ours, "unknown_field") and not hasattr(docarrays, "unknown_field")


def test_a_field_of_the_wrong_type_is_refused_as_docarray_refuses_it():
    class WrongWeight(BaseDoc):
        weight: str = "heavy"

    sent = IOMixin.to_protobuf(WrongWeight(id="w"))
    with pytest.raises(ValueError, match="weight"):
        QueryPart.from_protobuf(sent)
    with pytest.raises(ValueError, match="weight"):
        IOMixin.from_protobuf.__func__(QueryPart, sent)
