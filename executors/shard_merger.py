"""ShardMerger: runs after the SimpleIndexer's shards (``uses_after``) and makes their answers one.

jina concatenates the shards' matches unsorted; this cuts them to the global top-k, best first,
so that N shards answer exactly what one shard over the same data answers. Status answers of
the shards are summed into one.
"""

import logging
from typing import Dict, Optional

from docarray import DocList
from jina import Executor, requests

from executors.docs import DuplicateGroup, Hit, ImageInput, IndexStatus, KeyDoc, TextQuery
from executors.params import MAX_LIMIT, as_int, request_options

logger = logging.getLogger(__name__)



def _shard_answers(docs, docs_matrix):
    """The shards' answers side by side: jina hands a ``uses_after`` executor all of them in ``docs_matrix``."""
    return list(docs_matrix) if docs_matrix else [docs]


class ShardMerger(Executor):
    def __init__(self, limit: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.defaults = dict(limit=int(limit))

    @requests(on="/search")
    def search(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, docs_matrix=None,
               **kwargs) -> DocList[TextQuery]:
        limit = int(request_options(self.defaults, parameters, {"limit": as_int(1, MAX_LIMIT)})["limit"])
        answers = _shard_answers(docs, docs_matrix)
        merged = DocList[TextQuery]()
        for position, query in enumerate(answers[0]):
            best: Dict[str, Hit] = {}
            errors = []
            for answer in answers:
                shard_query = answer[position]
                if shard_query.error:
                    errors.append(shard_query.error)
                for match in shard_query.matches:
                    if match.id not in best or match.score > best[match.id].score:
                        best[match.id] = match
            query.matches = DocList[Hit](sorted(best.values(), key=lambda m: (-m.score, m.id))[:limit])
            query.error = errors[0] if errors and len(errors) == len(answers) else None
            merged.append(query)
        return merged

    @requests(on=["/index", "/update"])
    def index(self, docs: DocList[ImageInput], docs_matrix=None, **kwargs) -> DocList[ImageInput]:
        """Every shard answers every document; the one that owns it (a hash of its id) set its status."""
        answers = _shard_answers(docs, docs_matrix)
        merged = DocList[ImageInput]()
        for position, doc in enumerate(answers[0]):
            merged.append(next((a[position] for a in answers if a[position].status), doc))
        return merged

    @requests(on="/classify")
    def classify(self, docs: DocList[TextQuery], docs_matrix=None, **kwargs) -> DocList[TextQuery]:
        return _shard_answers(docs, docs_matrix)[0]  # every shard passed the same answer through

    @requests(on="/duplicates")
    def duplicates(self, docs: DocList[DuplicateGroup], docs_matrix=None, **kwargs) -> DocList[DuplicateGroup]:
        """Each shard's groups; images on different shards are compared within their own shard only."""
        groups = [g for answer in _shard_answers(docs, docs_matrix) for g in answer]
        return DocList[DuplicateGroup](sorted(groups, key=lambda g: -len(g.members)))

    @requests(on="/lookup")
    def lookup(self, docs: DocList[KeyDoc], docs_matrix=None, **kwargs) -> DocList[KeyDoc]:
        answers = _shard_answers(docs, docs_matrix)
        merged = DocList[KeyDoc]()
        for position, doc in enumerate(answers[0]):
            found = next((a[position] for a in answers if a[position].found), doc)
            merged.append(found)
        return merged

    @requests(on="/list")
    def list_documents(self, docs: DocList[KeyDoc], parameters: Optional[Dict] = None, docs_matrix=None,
                       **kwargs) -> DocList[KeyDoc]:
        """Each shard answers its next page in id order; the merged page is the smallest ids of them all."""
        page = max(1, min(int((parameters or {}).get("page", 1000)), 10_000))
        everything = [d for answer in _shard_answers(docs, docs_matrix) for d in answer]
        return DocList[KeyDoc](sorted(everything, key=lambda d: d.id)[:page])

    @requests(on="/delete")
    def delete(self, docs: DocList[KeyDoc], docs_matrix=None, **kwargs) -> DocList[KeyDoc]:
        return self.lookup(docs, docs_matrix=docs_matrix)

    @requests(on=["/status", "/clear"])
    def status(self, docs: DocList[IndexStatus], docs_matrix=None, **kwargs) -> DocList[IndexStatus]:
        shards = [a[0] for a in _shard_answers(docs, docs_matrix) if len(a)]
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
