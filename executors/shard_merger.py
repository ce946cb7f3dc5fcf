"""ShardMerger: runs after the SimpleIndexer's shards (``uses_after``) and makes their answers one.

jina concatenates the shards' matches unsorted; this cuts them to the global top-k, best first,
so that N shards answer exactly what one shard over the same data answers. Status answers of
the shards are summed into one.

An answer from some of the shards only is never passed on as if it were whole. jina's head drops the
answer of a shard it cannot reach, and passes on the request of a shard whose executor raised with its
documents as they were sent, its error in a header no executor sees. So with several shards each
SimpleIndexer ends every answer with a mark (``mark_answer``): its shard number, the number of shards,
and the error its endpoint raised, if any. The merger expects a mark from every one of its ``shards``
and answers an error naming each shard that failed or did not answer instead of a partial answer; an
error that every shard raised alike (a request's bad parameter) is answered as one shard would answer it.
"""

import json
import logging
from typing import Dict, List, NamedTuple, Optional

from docarray import DocList
from jina import Executor, requests

from executors.docs import DuplicateGroup, Hit, ImageInput, IndexStatus, KeyDoc, QueryPart, TextQuery
from executors.params import MAX_LIMIT, RequestError, as_int, request_options

logger = logging.getLogger(__name__)

MARK = "clipseek-shard:"  # the id of the document that ends a shard's answer
# The endpoint that gives the stored vectors of document ids (as QueryPart embeddings), whichever shard
# holds them, and the /search parameter that carries them ({id: [float, ...]}), so that every shard
# builds the query vector of liked and disliked results from the same vectors.
VECTORS_ENDPOINT = "/vectors"
FEEDBACK_VECTORS = "feedback_vectors"


class ShardError(RuntimeError):
    """Some shard failed or did not answer: the answer of the others alone would be partial."""


class Mark(NamedTuple):
    shard: int
    shards: int
    error: Optional[str] = None
    kind: Optional[str] = None  # the class of the exception the shard's endpoint raised


def mark_answer(answer, schema, shard: int, shards: int, error: Optional[BaseException] = None):
    """``answer`` (a DocList, or None for a new one of ``schema``) ended with the mark of ``shard`` of ``shards``,
    carrying ``error`` where the endpoint raised it (the answer's documents then say nothing)."""
    out = schema() if answer is None or error is not None else answer
    payload = {"shard": int(shard), "shards": int(shards)}
    if error is not None:
        payload.update(error=str(error) or type(error).__name__, kind=type(error).__name__)
    out.append(out.doc_type(id=MARK + json.dumps(payload, sort_keys=True)))
    return out


def _read_mark(doc_id: str) -> Optional[Mark]:
    try:
        payload = json.loads(doc_id[len(MARK):])
        return Mark(int(payload["shard"]), int(payload["shards"]), payload.get("error"), payload.get("kind"))
    except (ValueError, KeyError, TypeError):
        return None


def _unmarked(answer):
    """(the answer without its mark, the mark or None)."""
    mark, kept = None, type(answer)()
    for doc in answer:
        if isinstance(doc.id, str) and doc.id.startswith(MARK):
            mark = _read_mark(doc.id) or mark
        else:
            kept.append(doc)
    return kept, mark


def _name(shard: int, shards: int) -> str:
    return f"indexer shard {shard} of {shards}"


PARTIAL = {
    "/index": "the documents it owns are not indexed or their status is unknown, so the answer would be partial "
              "(the other shards wrote theirs; indexing again is safe)",
    "/update": "the documents it owns are not updated or their status is unknown, so the answer would be partial",
    "/delete": "the documents it owns may not be deleted, so the answer would be partial",
}


class ShardMerger(Executor):
    """``shards``: how many shards answer each request (default: the sharded deployment's own ``shards``, which
    jina gives a ``uses_after``; a merger that is an executor of its own, as in the search flow of
    ``flows/cluster.py``, is told)."""

    def __init__(self, limit: int = 10, shards: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.defaults = dict(limit=int(limit))
        self.shards = max(1, int(shards or getattr(self.runtime_args, "shards", 1) or 1))

    def _answers(self, endpoint: str, docs, docs_matrix) -> List:
        """Every shard's answer, without its mark, in shard order; ShardError naming the shards that failed or did
        not answer where any did (RequestError, or ShardError, with the shards' own words where all failed alike)."""
        answers = list(docs_matrix) if docs_matrix else [docs]
        by_shard: Dict[int, tuple] = {}
        for answer in answers:
            kept, mark = _unmarked(answer)
            if mark is None:
                continue  # a shard's request handed on as it was sent: its executor never answered
            if mark.shards != self.shards and self.shards > 1:
                raise ShardError(f"{_name(mark.shard, mark.shards)} answered {endpoint}, but this merger expects "
                                 f"{self.shards} shards: start every shard and the merger with the same shards")
            by_shard[mark.shard] = (kept, mark)
        if not by_shard and self.shards == 1:
            return [_unmarked(a)[0] for a in answers]  # an indexer that marks nothing (one shard): as it answered
        expected = max([self.shards, *(m.shards for _, m in by_shard.values())])
        failed = {k: m for k, (_, m) in by_shard.items() if m.error is not None}
        missing = [k for k in range(expected) if k not in by_shard]
        if not failed and not missing:
            return [by_shard[k][0] for k in range(expected)]
        if not missing and len({(m.error, m.kind) for m in failed.values()}) == 1 and len(failed) == expected:
            mark = next(iter(failed.values()))  # every shard refused the request alike: one shard's answer
            raise (RequestError if mark.kind == "RequestError" else ShardError)(mark.error)
        problems = [f"{_name(k, expected)} failed ({m.kind}: {m.error})" for k, m in sorted(failed.items())]
        problems += [f"{_name(k, expected)} did not answer (down, unreachable, or failed before its executor ran)"
                     for k in missing]
        message = (f"{endpoint}: {'; '.join(problems)}: "
                   f"{PARTIAL.get(endpoint, 'the other shards alone would give a partial answer')}")
        logger.warning("%s", message)
        raise ShardError(message)

    @requests(on="/search")
    def search(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, docs_matrix=None,
               **kwargs) -> DocList[TextQuery]:
        limit = int(request_options(self.defaults, parameters, {"limit": as_int(1, MAX_LIMIT)})["limit"])
        answers = self._answers("/search", docs, docs_matrix)
        merged = DocList[TextQuery]()
        for position, query in enumerate(answers[0]):
            best: Dict[str, Hit] = {}
            errors = [answer[position].error for answer in answers]
            if len(set(errors)) > 1:  # a query some shards answered and others refused: its answer would be partial
                problems = [f"{_name(k, len(answers))}: {e}" for k, e in enumerate(errors) if e]
                raise ShardError(f"/search: query {position + 1} ({(query.text or 'without text')[:60]!r}): "
                                 f"{'; '.join(problems)}: the other shards alone would give a partial answer")
            for answer in answers:
                for match in answer[position].matches:
                    if match.id not in best or match.score > best[match.id].score:
                        best[match.id] = match
            query.matches = DocList[Hit](sorted(best.values(), key=lambda m: (-m.score, m.id))[:limit])
            query.error = errors[0]
            merged.append(query)
        return merged

    @requests(on=VECTORS_ENDPOINT)
    def vectors(self, docs: DocList[QueryPart], docs_matrix=None, **kwargs) -> DocList[QueryPart]:
        """Each id's stored vector from the shard that holds it (no embedding: no shard holds it)."""
        return self._first_that(VECTORS_ENDPOINT, docs, docs_matrix, DocList[QueryPart],
                                lambda doc: doc.embedding is not None)

    @requests(on="/index")
    def index(self, docs: DocList[ImageInput], docs_matrix=None, **kwargs) -> DocList[ImageInput]:
        """Every shard answers every document; the one that owns it (a hash of its id) set its status."""
        return self._first_that("/index", docs, docs_matrix, DocList[ImageInput], lambda doc: bool(doc.status))

    @requests(on="/update")
    def update(self, docs: DocList[ImageInput], docs_matrix=None, **kwargs) -> DocList[ImageInput]:
        return self._first_that("/update", docs, docs_matrix, DocList[ImageInput], lambda doc: bool(doc.status))

    def _first_that(self, endpoint: str, docs, docs_matrix, schema, answered) -> DocList:
        """Per position, the first shard's document for which ``answered(document)`` holds (the shard that
        holds or owns it answered it), else the document as the first shard returned it."""
        answers = self._answers(endpoint, docs, docs_matrix)
        return schema([next((a[position] for a in answers if answered(a[position])), doc)
                       for position, doc in enumerate(answers[0])])

    @requests(on="/classify")
    def classify(self, docs: DocList[TextQuery], docs_matrix=None, **kwargs) -> DocList[TextQuery]:
        """Every shard passes the encoders' answer through, so any one that answered gives it whole."""
        answers = [_unmarked(a) for a in (list(docs_matrix) if docs_matrix else [docs])]
        whole = [kept for kept, mark in answers if mark is None or mark.error is None]
        return whole[0] if whole else self._answers("/classify", docs, docs_matrix)[0]

    @requests(on="/duplicates")
    def duplicates(self, docs: DocList[DuplicateGroup], docs_matrix=None, **kwargs) -> DocList[DuplicateGroup]:
        """Each shard's groups; images on different shards are compared within their own shard only."""
        groups = [g for answer in self._answers("/duplicates", docs, docs_matrix) for g in answer]
        return DocList[DuplicateGroup](sorted(groups, key=lambda g: -len(g.members)))

    @requests(on="/lookup")
    def lookup(self, docs: DocList[KeyDoc], docs_matrix=None, **kwargs) -> DocList[KeyDoc]:
        return self._first_that("/lookup", docs, docs_matrix, DocList[KeyDoc], lambda doc: doc.found)

    @requests(on="/delete")
    def delete(self, docs: DocList[KeyDoc], docs_matrix=None, **kwargs) -> DocList[KeyDoc]:
        return self._first_that("/delete", docs, docs_matrix, DocList[KeyDoc], lambda doc: doc.found)

    @requests(on="/list")
    def list_documents(self, docs: DocList[KeyDoc], parameters: Optional[Dict] = None, docs_matrix=None,
                       **kwargs) -> DocList[KeyDoc]:
        """Each shard answers its next page in id order; the merged page is the smallest ids of them all."""
        page = max(1, min(int((parameters or {}).get("page", 1000)), 10_000))
        everything = [d for answer in self._answers("/list", docs, docs_matrix) for d in answer]
        return DocList[KeyDoc](sorted(everything, key=lambda d: d.id)[:page])

    @requests(on="/status")
    def status(self, docs: DocList[IndexStatus], docs_matrix=None, **kwargs) -> DocList[IndexStatus]:
        return self._summed("/status", docs, docs_matrix)

    @requests(on="/clear")
    def clear(self, docs: DocList[IndexStatus], docs_matrix=None, **kwargs) -> DocList[IndexStatus]:
        return self._summed("/clear", docs, docs_matrix)

    def _summed(self, endpoint: str, docs, docs_matrix) -> DocList[IndexStatus]:
        shards = [a[0] for a in self._answers(endpoint, docs, docs_matrix) if len(a)]
        if len(shards) <= 1:
            return DocList[IndexStatus](shards)
        dims = {d.dim for d in shards if d.dim}
        models = {d.model for d in shards if d.model}
        if len(dims) > 1 or len(models) > 1:
            logger.warning("shards disagree: dims %s, models %s", dims, models)
        merged = IndexStatus(count=sum(d.count for d in shards), dim=min(dims) if dims else None,
                             model=sorted(models)[0] if models else None,
                             bytes_on_disk=sum(d.bytes_on_disk for d in shards),
                             schema_version=shards[0].schema_version,
                             path=";".join(sorted(d.path or "" for d in shards)))
        return DocList[IndexStatus]([merged])
