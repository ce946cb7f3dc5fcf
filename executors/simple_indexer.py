"""SimpleIndexer: stores embeddings in a memory-mapped VectorStore and answers top-k cosine search."""

# No "from __future__ import annotations" in executor modules: jina reads the endpoint annotations as types.


import logging
import os
from typing import Dict, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from executors.docs import STATUS_FAILED, STATUS_INDEXED, Hit, ImageInput, IndexStatus, KeyDoc, TextQuery
from executors.filters import FilterError
from executors.params import request_options
from executors.vector_store import Record, StoreError, VectorStore

logger = logging.getLogger(__name__)

WORKSPACE_ENV = "CLIPSEEK_WORKSPACE"


class SimpleIndexer(Executor):
    """Exact cosine search over vectors on disk.

    Files live under ``index_dir`` if given, else ``$CLIPSEEK_WORKSPACE/SimpleIndexer/<shard>``,
    else the executor's jina workspace (``<workspace>/SimpleIndexer/<shard>``). Request parameters: ``limit``, ``min_score``, ``filter``
    (see ``executors/filters.py``) and ``return_embeddings`` override the defaults.
    """

    def __init__(
        self,
        index_dir: Optional[str] = None,
        limit: int = 10,
        min_score: Optional[float] = None,
        return_embeddings: bool = False,
        chunk_rows: int = 65536,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.defaults = dict(limit=int(limit), min_score=min_score, filter=None, return_embeddings=bool(return_embeddings))
        self.store = VectorStore(self._resolve_dir(index_dir), chunk_rows=chunk_rows)
        logger.info("index at %s: %d documents", self.store.path, self.store.count)

    def _resolve_dir(self, index_dir: Optional[str]) -> str:
        if index_dir:
            return index_dir
        shard = str(getattr(self.runtime_args, "shard_id", 0) or 0)
        if os.environ.get(WORKSPACE_ENV):
            return os.path.join(os.environ[WORKSPACE_ENV], type(self).__name__, shard)
        return self.workspace or os.path.join("workspace", type(self).__name__, shard)

    @requests(on="/index")
    def index(self, docs: DocList[ImageInput], parameters: Optional[Dict] = None, **kwargs) -> DocList[ImageInput]:
        options = request_options(self.defaults, parameters)
        last_of_id = {doc.id: pos for pos, doc in enumerate(docs)}
        batch = []
        for pos, doc in enumerate(docs):
            if doc.error or doc.embedding is None:
                doc.status = STATUS_FAILED
                doc.error = doc.error or f"{doc.uri or doc.id}: no embedding to index"
            elif last_of_id[doc.id] != pos:
                doc.status = STATUS_FAILED
                doc.error = f"{doc.uri or doc.id}: duplicate id {doc.id} in this batch; the later document was indexed"
            else:
                batch.append(doc)
        by_model: Dict[Optional[str], list] = {}
        for doc in batch:
            by_model.setdefault(doc.embedding_model, []).append(doc)
        for model, group in by_model.items():
            try:
                vectors = np.stack([np.asarray(d.embedding, dtype=np.float32).ravel() for d in group])
                self.store.upsert(vectors, [_record(d) for d in group], model=model)
                for d in group:
                    d.status, d.error = STATUS_INDEXED, None
            except (StoreError, ValueError) as e:
                logger.warning("refused %d documents: %s", len(group), e)
                for d in group:
                    d.status, d.error = STATUS_FAILED, f"{d.uri or d.id}: {e}"
        if not options["return_embeddings"]:
            for doc in docs:
                doc.embedding = None
        return docs

    @requests(on="/search")
    def search(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        options = request_options(self.defaults, parameters)
        limit = int(options["limit"])
        min_score = None if options["min_score"] is None else float(options["min_score"])
        queries = []
        for doc in docs:
            doc.matches = DocList[Hit]()
            if doc.error:
                continue
            if doc.embedding is None:
                doc.error = "query has no embedding (was it sent through a text encoder?)"
                continue
            model = self.store.model
            if model and doc.embedding_model and doc.embedding_model != model:
                doc.error = (f"query was embedded by model {doc.embedding_model!r}, the index holds embeddings "
                             f"of {model!r}: search with the model the index was built with")
                continue
            queries.append(doc)
        if queries:
            try:
                results = self.store.search(
                    np.stack([np.asarray(d.embedding, dtype=np.float32).ravel() for d in queries]),
                    limit=limit, min_score=min_score, where=options["filter"],
                )
            except (StoreError, FilterError) as e:
                for doc in queries:
                    doc.error = str(e)
                results = []
            for doc, hits in zip(queries, results):
                doc.matches = DocList[Hit]([_hit(record, score) for record, score in hits])
        if not options["return_embeddings"]:
            for doc in docs:
                doc.embedding = None
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
        return docs

    @requests(on="/delete")
    def delete(self, docs: DocList[KeyDoc], parameters: Optional[Dict] = None, **kwargs) -> DocList[KeyDoc]:
        ids = [d.id for d in docs] + list((parameters or {}).get("ids") or [])
        existing = self.store.get(ids)
        self.store.delete(ids)
        for doc in docs:
            doc.found = doc.id in existing
        logger.info("deleted %d documents", len(existing))
        return docs

    @requests(on="/clear")
    def clear(self, **kwargs) -> DocList[IndexStatus]:
        removed = self.store.clear()
        logger.info("cleared the index (%d documents removed)", removed)
        return DocList[IndexStatus]([IndexStatus(**self.store.status())])

    @requests(on="/status")
    def status(self, **kwargs) -> DocList[IndexStatus]:
        return DocList[IndexStatus]([IndexStatus(**self.store.status())])

    def close(self) -> None:
        self.store.close()
        super().close()


def _record(doc: ImageInput) -> Record:
    return Record(id=doc.id, uri=doc.uri or (str(doc.url) if doc.url and not str(doc.url).startswith("data:") else None),
                  tags=dict(doc.tags or {}), content_hash=doc.content_hash, mtime=doc.mtime, size=doc.size,
                  width=doc.width, height=doc.height)


def _hit(record: Record, score: float) -> Hit:
    return Hit(id=record.id, uri=record.uri, score=score, tags=record.tags, width=record.width, height=record.height,
               mtime=record.mtime, size=record.size)
