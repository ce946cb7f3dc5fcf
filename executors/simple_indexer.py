"""SimpleIndexer: stores embeddings in a memory-mapped VectorStore and answers top-k cosine search."""

# No "from __future__ import annotations" in executor modules: jina reads the endpoint annotations as types.


import hashlib
import logging
import os
from typing import Dict, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from executors.docs import (STATUS_FAILED, STATUS_INDEXED, DuplicateGroup, Hit, ImageInput, IndexStatus, KeyDoc, TextQuery,
                            QueryPart, VideoMoment, has_image)
from executors.images.video import format_time, moment_uri
from executors.store.filters import FilterError
from executors.params import MAX_LIMIT, RequestError, as_any, as_bool, as_float, as_int, as_flag, request_options
from executors.shard_merger import FEEDBACK_VECTORS, VECTORS_ENDPOINT, mark_answer
from executors.store.vector_store import Record, StoreError, VectorStore

logger = logging.getLogger(__name__)

WEIGHT = as_float(-100.0, 100.0)
# What a request's parameters may set; where the files live and how they are stored are fixed at start.
REQUEST_OPTIONS = {"limit": as_int(1, MAX_LIMIT), "min_score": as_float(), "filter": as_any,
                   "return_embeddings": as_bool, "like": as_any, "unlike": as_any, "query_weight": WEIGHT,
                   "like_weight": WEIGHT, "unlike_weight": WEIGHT, "all_moments": as_bool, FEEDBACK_VECTORS: as_any}
DUPLICATE_OPTIONS = {"threshold": as_float(0.5, 1.0)}
LIST_OPTIONS = {"after_id": as_any, "page": as_int(1, 10_000)}


class SimpleIndexer(Executor):
    """Exact cosine search over vectors on disk.

    Files live under ``index_dir`` if given, else in the executor's jina workspace
    (``<workspace>/SimpleIndexer/<shard>``), so two flows on one workspace share one index.

    Request parameters (only these; ``REQUEST_OPTIONS``) override the defaults: ``limit`` (1 to
    ``MAX_LIMIT``), ``min_score``, ``filter`` (see
    ``executors/filters.py``), ``return_embeddings``, and for relevance feedback ``like`` /
    ``unlike`` (ids of results) with ``query_weight`` (1.0), ``like_weight`` (0.75) and
    ``unlike_weight`` (0.25): the query vector is the normalized sum of the weighted query,
    its weighted ``parts``, the mean of the liked vectors and minus the mean of the disliked
    ones, all read from the index. Disliked ids are left out of the results.

    ``storage_dtype`` (``float32`` or ``float16``) sets how a new or empty index stores its vectors;
    ``None`` (the default) keeps what the index records, float32 for a new one. float16 halves the
    file and the memory the map needs, at a recall@10 cost measured in ``benchmarks/indexer_bench.py``.

    ``read_only`` (the search flow's indexer): the store is opened for reading only, never takes the
    writer lock, and ``/index``, ``/update``, ``/delete`` and ``/clear`` are refused; the index flow is the
    one writer.
    """

    def __init__(
        self,
        index_dir: Optional[str] = None,
        limit: int = 10,
        min_score: Optional[float] = None,
        return_embeddings: bool = False,
        query_weight: float = 1.0,
        like_weight: float = 0.75,
        unlike_weight: float = 0.25,
        chunk_rows: int = 65536,
        storage_dtype: Optional[str] = None,
        read_only: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.read_only = as_flag(read_only, "read_only")
        self.defaults = dict(limit=int(limit), min_score=min_score, filter=None, return_embeddings=bool(return_embeddings),
                             like=None, unlike=None, query_weight=float(query_weight), like_weight=float(like_weight),
                             unlike_weight=float(unlike_weight), all_moments=False)
        self.shard_id = int(getattr(self.runtime_args, "shard_id", 0) or 0)
        self.shards = max(1, int(getattr(self.runtime_args, "shards", 1) or 1))
        self.store = VectorStore(self._resolve_dir(index_dir), chunk_rows=chunk_rows, dtype=storage_dtype,
                                 read_only=self.read_only)
        try:
            self.store.check_shards(self.shard_id, self.shards)
        except StoreError:
            self.store.close()
            raise
        logger.info("index at %s: %d documents (%s)", self.store.path, self.store.count, self.store.dtype)

    def _resolve_dir(self, index_dir: Optional[str]) -> str:
        if index_dir:
            return index_dir
        shard = str(getattr(self.runtime_args, "shard_id", 0) or 0)
        return self.workspace or os.path.join("workspace", type(self).__name__, shard)

    def _owns(self, doc_id: str) -> bool:
        """Whether this shard keeps the document of ``doc_id`` (``shard_of``; one shard keeps everything)."""
        return self.shards == 1 or shard_of(doc_id, self.shards) == self.shard_id

    def _check_writable(self, endpoint: str) -> None:
        if self.read_only:
            raise RequestError(f"{endpoint} is refused here: this flow reads the index and never writes it; "
                               f"send {endpoint} to the index flow (clipseek serve --index-port)")

    @requests(on="/index")
    def index(self, docs: DocList[ImageInput], parameters: Optional[Dict] = None, **kwargs) -> DocList[ImageInput]:
        self._check_writable("/index")
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        last_of_id = {doc.id: pos for pos, doc in enumerate(docs)}
        last_of_uri = {_stored_uri(doc): pos for pos, doc in enumerate(docs) if _stored_uri(doc)}
        batch = []
        for pos, doc in enumerate(docs):
            uri = _stored_uri(doc)
            if doc.error or (doc.embedding is None and not len(doc.moments)):
                doc.status = STATUS_FAILED
                doc.error = doc.error or f"{doc.uri or doc.id}: no embedding to index"
            elif last_of_id[doc.id] != pos:
                doc.status = STATUS_FAILED
                doc.error = f"{doc.uri or doc.id}: duplicate id {doc.id} in this batch; the later document was indexed"
            elif uri and last_of_uri[uri] != pos:
                doc.status = STATUS_FAILED
                doc.error = f"{uri}: the same picture twice in this batch; the later document was indexed"
            else:
                batch.append(doc)
        if self.shards > 1:  # every shard sees every /index request; each keeps the documents it owns
            mine, others = [], []
            for doc in batch:
                (mine if self._owns(doc.id) else others).append(doc)
            if others:  # an earlier copy here (another id for the same file, another layout) goes
                self.store.evict([d.id for d in others], [_stored_uri(d) for d in others])
            batch = mine
            for doc in others:
                doc.status = None  # answered by the owning shard (executors/shard_merger.py)
        by_model: Dict[Optional[str], list] = {}
        for doc in batch:
            by_model.setdefault(doc.embedding_model, []).append(doc)
        for model, group in by_model.items():
            try:
                rows = [(vector, record) for d in group for vector, record in _rows(d)]
                self.store.upsert(np.stack([v for v, _ in rows]), [r for _, r in rows], model=model,
                                  replace_sources=True)
                for d in group:
                    d.status, d.error = STATUS_INDEXED, None
            except (StoreError, ValueError) as e:
                logger.warning("refused %d documents: %s", len(group), e)
                for d in group:
                    d.status, d.error = STATUS_FAILED, f"{d.uri or d.id}: {e}"
        if not options["return_embeddings"]:
            for doc in docs:
                doc.embedding = None
                doc.moments = DocList[VideoMoment]()
        return docs

    @requests(on="/update")
    def update(self, docs: DocList[ImageInput], **kwargs) -> DocList[ImageInput]:
        """Add each document's ``tags`` to the stored document of its id, without embedding it again."""
        self._check_writable("/update")
        mine = [d for d in docs if self._owns(d.id)]
        found = set(self.store.update_tags({d.id: dict(d.tags or {}) for d in mine}))
        for doc in mine:
            doc.status = STATUS_INDEXED if doc.id in found else STATUS_FAILED
            doc.error = None if doc.id in found else f"{doc.uri or doc.id}: not in the index"
        return docs

    @requests(on="/search")
    def search(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        limit = int(options["limit"])
        min_score = None if options["min_score"] is None else float(options["min_score"])
        try:
            like, unlike = _id_list(options["like"], "like"), _id_list(options["unlike"], "unlike")
            sent = _sent_vectors(options.get(FEEDBACK_VECTORS), like + unlike, self.store.dim)
        except ValueError as e:
            for doc in docs:
                doc.matches, doc.error = DocList[Hit](), str(e)
            return docs
        # The vectors a request sends for liked / disliked ids (the search flow's gateway fetches them from the
        # shards that hold them) come first: then every shard builds the same query vector.
        wanted = [i for i in like + unlike if i not in sent]
        stored = {**(self.store.vectors(wanted) if wanted else {}), **sent}
        missing = [i for i in dict.fromkeys(like + unlike) if i not in stored]
        queries, vectors = [], []
        for doc in docs:
            doc.matches = DocList[Hit]()
            if doc.error:
                continue
            try:
                if missing:
                    raise ValueError(f"like/unlike name ids that are not in the index: {', '.join(missing[:5])}")
                vectors.append(self._query_vector(doc, options, [stored[i] for i in like], [stored[i] for i in unlike]))
                queries.append(doc)
            except ValueError as e:
                doc.error = str(e)
        if queries:
            try:
                results = self.store.search(np.stack(vectors), limit=limit + len(unlike), min_score=min_score,
                                            where=options["filter"], one_per_source=not options["all_moments"])
            except (StoreError, FilterError) as e:
                for doc in queries:
                    doc.error = str(e)
                results = []
            hidden = set(unlike)
            for doc, hits in zip(queries, results):
                kept = [(record, score) for record, score in hits if record.id not in hidden][:limit]
                doc.matches = DocList[Hit]([_hit(record, score) for record, score in kept])
        if not options["return_embeddings"]:
            for doc in docs:
                doc.embedding = None
                for part in doc.parts:
                    part.embedding = None
        return docs

    def _query_vector(self, doc: TextQuery, options: Dict, liked, disliked) -> np.ndarray:
        """Rocchio-style: weight x query + sum of weighted parts + like_weight x mean(liked)
        - unlike_weight x mean(disliked), normalized. Raises ValueError naming what is wrong."""
        model = self.store.model
        total = None
        for item, weight in [(doc, 1.0), *((p, float(p.weight)) for p in doc.parts)]:
            if item.error:
                raise ValueError(item.error)
            if item.embedding is None:
                continue
            if model and item.embedding_model and item.embedding_model != model:
                raise ValueError(f"query was embedded by model {item.embedding_model!r}, the index holds embeddings "
                                 f"of {model!r}: search with the model the index was built with")
            vector = _unit(np.asarray(item.embedding, dtype=np.float32).ravel())
            weight = weight * float(options["query_weight"]) if item is doc else weight
            total = weight * vector if total is None else total + weight * vector
        if liked:
            part = float(options["like_weight"]) * _unit(np.mean(liked, axis=0))
            total = part if total is None else total + part
        if disliked and total is not None:
            total = total - float(options["unlike_weight"]) * _unit(np.mean(disliked, axis=0))
        if total is None:
            if (doc.text or "").strip() or has_image(doc):
                raise ValueError("query has no embedding (was it sent through the encoders?)")
            raise ValueError("empty query: give some text to search for, an image, or liked results")
        if not np.isfinite(total).all() or not np.linalg.norm(total):
            raise ValueError("the query's parts cancel out: nothing is left to search for")
        return _unit(total)

    @requests(on=VECTORS_ENDPOINT)
    def vectors(self, docs: DocList[QueryPart], **kwargs) -> DocList[QueryPart]:
        """The stored vector of each document id as its ``embedding`` (with the index's ``embedding_model``);
        none for an id this index does not hold. With several shards the ShardMerger takes each from the shard
        that holds it: the search flow's gateway sends them with a search (``FEEDBACK_VECTORS``), so that every
        shard builds the query vector of liked and disliked results alike."""
        stored = self.store.vectors([d.id for d in docs]) if len(docs) else {}
        model = self.store.model
        for doc in docs:
            vector = stored.get(doc.id)
            doc.embedding, doc.embedding_model = vector, model if vector is not None else None
        return docs

    async def __acall__(self, req_endpoint: str, **kwargs):
        """Each endpoint's answer; with several shards ended with this shard's mark, which carries the error the
        endpoint raised instead of raising it, so that the ShardMerger can tell a shard that failed or never
        answered from one that found nothing (``executors/shard_merger.py``)."""
        endpoint = self.requests.get(req_endpoint)
        if self.shards == 1 or endpoint is None:
            return await super().__acall__(req_endpoint, **kwargs)
        schema = endpoint.response_schema
        try:
            answer = await super().__acall__(req_endpoint, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the merger, which answers it
            logger.warning("shard %d of %d: %s failed: %r", self.shard_id, self.shards, req_endpoint, e,
                           exc_info=not isinstance(e, (RequestError, StoreError)))
            return mark_answer(None, schema, self.shard_id, self.shards, e)
        return mark_answer(answer if answer is not None else kwargs.get("docs"), schema, self.shard_id, self.shards)

    @requests(on="/duplicates")
    def duplicates(self, docs: DocList[DuplicateGroup], parameters: Optional[Dict] = None,
                   **kwargs) -> DocList[DuplicateGroup]:
        """Groups of near-identical images in this index (``threshold``, default 0.95 cosine, from 0.5 to 1)."""
        threshold = request_options({"threshold": 0.95}, parameters, DUPLICATE_OPTIONS)["threshold"]
        groups = self.store.near_duplicates(threshold)
        return DocList[DuplicateGroup]([DuplicateGroup(members=DocList[Hit]([_hit(r, s) for r, s in g])) for g in groups])

    @requests(on="/classify")
    def classify(self, docs: DocList[TextQuery], **kwargs) -> DocList[TextQuery]:
        """Labels are answered by the encoders before the indexer; the index is not consulted."""
        return docs

    @requests(on="/lookup")
    def lookup(self, docs: DocList[KeyDoc], **kwargs) -> DocList[KeyDoc]:
        """Stored file facts of each document id (``found`` False for unknown ids)."""
        records = self.store.get([d.id for d in docs])
        for doc in docs:
            record = records.get(doc.id)
            doc.found = record is not None
            if record is not None:
                doc.uri, doc.content_hash, doc.mtime, doc.size = record.uri, record.content_hash, record.mtime, record.size
                doc.t = record.t if record.id == doc.id else None  # a moment asked for by its own id
        return docs

    @requests(on="/list")
    def list_documents(self, docs: DocList[KeyDoc], parameters: Optional[Dict] = None, **kwargs) -> DocList[KeyDoc]:
        """A page of stored documents (id, uri, file facts) in id order: parameters ``after_id``
        (the last id of the previous page, "" to start) and ``page`` (default 1000, at most 10,000)."""
        params = request_options({"after_id": "", "page": 1000}, parameters, LIST_OPTIONS)
        records = self.store.page_by_id(str(params["after_id"] or ""), params["page"])
        return DocList[KeyDoc]([KeyDoc(id=r.id, uri=r.uri, content_hash=r.content_hash, mtime=r.mtime, size=r.size,
                                       found=True) for r in records])

    @requests(on="/delete")
    def delete(self, docs: DocList[KeyDoc], parameters: Optional[Dict] = None, **kwargs) -> DocList[KeyDoc]:
        self._check_writable("/delete")
        try:
            extra = _id_list((parameters or {}).get("ids"), "ids")
        except ValueError as e:
            raise RequestError(str(e)) from None
        ids = [d.id for d in docs] + extra
        existing = self.store.get(ids)
        self.store.delete(ids)
        for doc in docs:
            doc.found = doc.id in existing
        logger.info("deleted %d documents", len(existing))
        return docs

    @requests(on="/clear")
    def clear(self, **kwargs) -> DocList[IndexStatus]:
        self._check_writable("/clear")
        removed = self.store.clear()
        logger.info("cleared the index (%d documents removed)", removed)
        return DocList[IndexStatus]([IndexStatus(**self.store.status())])

    @requests(on="/status")
    def status(self, **kwargs) -> DocList[IndexStatus]:
        return DocList[IndexStatus]([IndexStatus(**self.store.status())])

    def close(self) -> None:
        self.store.close()
        super().close()


def shard_of(doc_id: str, shards: int) -> int:
    """The shard that owns a document: a stable hash of its id (the same in every process and run)."""
    return int.from_bytes(hashlib.sha1(doc_id.encode("utf-8", "surrogateescape")).digest()[:8], "big") % shards


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector


def _id_list(value, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a list of document ids, got {value!r}")


def _sent_vectors(value, ids, dim: Optional[int]) -> Dict[str, np.ndarray]:
    """The vectors a search request sent for its liked / disliked ``ids`` (``FEEDBACK_VECTORS``: {id: [float,
    ...]}; any other id is ignored). Raises ValueError naming what is wrong."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{FEEDBACK_VECTORS} must map document ids to vectors, got {type(value).__name__}")
    out = {}
    for key in set(ids) & set(value):
        try:
            vector = np.asarray(value[key], dtype=np.float32).ravel()
        except (TypeError, ValueError):
            raise ValueError(f"{FEEDBACK_VECTORS}[{key!r}] must be a list of numbers") from None
        if not vector.size or (dim and vector.size != dim) or not np.isfinite(vector).all():
            raise ValueError(f"{FEEDBACK_VECTORS}[{key!r}] must be {dim or 'some'} finite numbers, got "
                             f"{vector.size} values")
        out[key] = vector
    return out


def _stored_uri(doc: ImageInput) -> Optional[str]:
    """The name a document is stored under (its ``uri``, else its ``url`` unless a data URI): one entry per name."""
    return doc.uri or (str(doc.url) if doc.url and not str(doc.url).startswith("data:") else None)


def _record(doc: ImageInput, **moment) -> Record:
    return Record(id=doc.id, uri=_stored_uri(doc),
                  tags=dict(doc.tags or {}), content_hash=doc.content_hash, mtime=doc.mtime, size=doc.size,
                  width=doc.width, height=doc.height, taken=doc.taken, taken_from=doc.taken_from, camera=doc.camera,
                  latitude=doc.latitude, longitude=doc.longitude, **moment)


def _rows(doc: ImageInput):
    """(vector, record) of each entry a document makes: a picture one, a video one per moment, each moment
    under the id ``<video id>:t<seconds>`` with the video as its ``source``."""
    if not len(doc.moments):
        return [(np.asarray(doc.embedding, dtype=np.float32).ravel(), _record(doc))]
    out = []
    for moment in doc.moments:
        if moment.embedding is None:
            raise ValueError(f"moment at {format_time(moment.t)} s has no embedding")
        record = _record(doc, source=doc.id, t=float(moment.t))
        record.id = f"{doc.id}:t{format_time(moment.t)}"
        out.append((np.asarray(moment.embedding, dtype=np.float32).ravel(), record))
    return out


def _hit(record: Record, score: float) -> Hit:
    uri = moment_uri(record.uri, record.t) if record.t is not None and record.uri else record.uri
    return Hit(id=record.id, uri=uri, score=score, t=record.t, tags=record.tags, width=record.width, height=record.height,
               mtime=record.mtime, size=record.size, taken=record.taken, taken_from=record.taken_from,
               camera=record.camera, latitude=record.latitude, longitude=record.longitude)
