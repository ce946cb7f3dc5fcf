"""A thin typed client for the index and search flows, over gRPC (one open channel per flow).

    from clipseek.client import ClipseekClient
    client = ClipseekClient()                       # 127.0.0.1:51000 (index) and :51001 (search)
    report = client.index(["~/Pictures", "https://example.org/cat.jpg"])
    for hit in client.search("a black cat", limit=5):
        print(hit.score, hit.uri)
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from docarray import DocList

from executors.docs import (STATUS_INDEXED, DuplicateGroup, Hit, ImageInput, IndexStatus, KeyDoc, QueryPart, TextQuery,
                            has_image)
from executors.images.imaging import (URL_PREFIXES, content_hash, is_image_file, local_path, not_a_regular_file,
                                      path_uri, uri_id)
from executors.images.video import is_media_file, media_extensions
from flows.settings import DEFAULT_REQUEST_SIZE, Settings
from flows.transport import GrpcTransport, TransportError

logger = logging.getLogger(__name__)

# Image bytes sent in one request at most (a remote server's gateway refuses requests over 256 MiB).
MAX_REQUEST_BYTES = 64 * 2**20
# The search flow's executors a query without images goes through (jina matches it against each executor's
# name): every one but the image encoder. A flow whose executors are named otherwise is simply not shortened.
TEXT_ONLY_ROUTE = r"^(?!image_encoder$)"


class ClipseekError(RuntimeError):
    """A request the flows could not answer; the message says which and why."""


@dataclass
class IndexReport:
    indexed: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)  # skipped, not embedded again
    tagged: List[str] = field(default_factory=list)  # unchanged, and given tags were added to the stored picture
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def merge(self, other: "IndexReport") -> None:
        self.indexed += other.indexed
        self.unchanged += other.unchanged
        self.tagged += other.tagged
        self.failed += other.failed


def expand_sources(items: Iterable[str], report: Optional[IndexReport] = None) -> List[str]:
    """Folders (recursively, picture and video extensions only), globs, files and URLs -> a list of sources.
    A local file is named by its real path (symlinks and ``..`` resolved), so a file reached by several
    paths (a symlink loop under a ``**`` glob, a linked folder) is one source. A path that matches nothing
    is recorded as failed in ``report``."""
    out: List[str] = []
    seen = set()

    def add(source: str) -> None:
        if not source.startswith(URL_PREFIXES):
            source = os.path.realpath(source)
        if source not in seen:
            seen.add(source)
            out.append(source)

    for item in items:
        item = str(item)
        if item.startswith(URL_PREFIXES):
            add(item)
            continue
        path = os.path.expanduser(item)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if is_media_file(name):
                        add(os.path.abspath(os.path.join(root, name)))
        elif os.path.isfile(path):
            add(os.path.abspath(path))
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and is_media_file(p))
            if not matches and report is not None:
                report.failed.append((item, "the pattern matches no picture or video files"))
            for match in matches:
                add(os.path.abspath(match))
        elif report is not None:
            report.failed.append((item, "no such file or directory"))
    return out


def when_filter(where: Optional[Dict[str, Any]], after=None, before=None) -> Optional[Dict[str, Any]]:
    """``where`` with ``taken`` at or after ``after`` and before ``before`` (ISO dates or epoch seconds); a
    date alone (``2019-09-01``) means its first moment, so ``before="2019-09-01"`` ends with August 31."""
    if after is None and before is None:
        return where
    taken: Dict[str, Any] = {}
    if after is not None:
        taken["$gte"] = after
    if before is not None:
        taken["$lt"] = before
    if where and "taken" in where:  # a filter on taken already: the range joins its operators
        taken = {**_as_ops(where["taken"]), **taken}
    return {**(where or {}), "taken": taken}


def _as_ops(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {"$eq": value}


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClipseekClient:
    """Index images and search them through the two flows."""

    def __init__(self, index_address: Optional[str] = None, search_address: Optional[str] = None,
                 *, send_bytes: Optional[bool] = None, timeout: float = 600.0):
        settings = Settings()
        self.index_address = index_address or settings.index_address
        self.search_address = search_address or settings.search_address
        index_host = urllib.parse.urlparse(self.index_address).hostname or "127.0.0.1"
        # A server on this machine reads local files itself; a remote one is sent the bytes.
        self.send_bytes = (not _is_loopback(index_host)) if send_bytes is None else send_bytes
        self.timeout = timeout
        self._transport = GrpcTransport()

    def close(self) -> None:
        """Close the open channels (a later request opens them again)."""
        self._transport.close()

    def __enter__(self) -> "ClipseekClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------
    def _post(self, address: str, endpoint: str, docs, return_type, parameters: Optional[dict] = None,
              target_executor: Optional[str] = None):
        """The one place requests go out; transport and server errors become ClipseekError."""
        try:
            return self._transport.post(address, endpoint, docs, return_type, parameters, timeout=self.timeout,
                                        target_executor=target_executor)
        except TransportError as e:
            if e.unreachable:
                raise ClipseekError(f"cannot reach {address}{endpoint}: is `clipseek serve` running? ({e})") from None
            raise ClipseekError(f"{address}{endpoint} failed: {e}") from None
        except ValueError as e:  # a malformed address
            raise ClipseekError(str(e)) from None

    # ---- index -------------------------------------------------------------------------
    def index(self, sources: Iterable[str], *, batch_size: int = DEFAULT_REQUEST_SIZE, tags: Optional[Dict[str, Any]] = None,
              force: bool = False, parameters: Optional[dict] = None,
              progress: Optional[Callable[[int, int], None]] = None) -> IndexReport:
        """Index files, folders, globs and URLs; unchanged files are skipped unless ``force``.

        ``progress(n, total)`` is called after each batch with the number of sources it
        handled and the number of sources in all.
        """
        if isinstance(sources, (str, bytes, os.PathLike)):
            sources = [os.fspath(sources)]
        report = IndexReport()
        expanded = expand_sources(sources, report)
        for start in range(0, len(expanded), batch_size):
            batch = expanded[start : start + batch_size]
            report.merge(self._index_batch(batch, tags=tags, force=force, parameters=parameters))
            if progress:
                progress(len(batch), len(expanded))
        return report

    def _index_batch(self, sources: Sequence[str], *, tags, force, parameters) -> IndexReport:
        report = IndexReport()
        ids = {source: uri_id(source) for source in sources}
        stored = {} if force else {d.id: d for d in self.lookup(list(ids.values())) if d.found}
        docs, retag = DocList[ImageInput](), DocList[ImageInput]()
        for source in sources:
            known = stored.get(ids[source])
            path = local_path(source)
            try:
                st = os.stat(path) if path is not None else None
            except OSError as e:
                report.failed.append((source, f"cannot read ({e.strerror})"))
                continue
            if st is not None and not_a_regular_file(st.st_mode):  # a FIFO or device would block the read
                report.failed.append((source, not_a_regular_file(st.st_mode)))
                continue
            # a file name that is not UTF-8 travels as a file:// URI that keeps its exact bytes
            name = path_uri(source) if path is not None else source
            if known is not None and _unchanged(known, path, st):
                report.unchanged.append(source)
                if tags:
                    retag.append(ImageInput(id=ids[source], uri=name, tags=dict(tags)))
                continue
            try:
                doc = ImageInput(id=ids[source], uri=name, tags=dict(tags or {}))
                if path is None or not self.send_bytes:
                    doc.url = name
            except ValueError:  # docarray refuses a url whose extension is not an image's
                report.failed.append((source, f"not a picture or video file (clipseek reads {media_extensions()})"))
                continue
            if path is not None and self.send_bytes:
                try:
                    with open(path, "rb") as f:
                        doc.bytes_ = f.read()
                except OSError as e:
                    report.failed.append((source, f"cannot read ({e.strerror})"))
                    continue
                doc.mtime, doc.size = st.st_mtime, st.st_size
            docs.append(doc)
        for part in _split_by_bytes(docs, MAX_REQUEST_BYTES):
            for doc in self._post(self.index_address, "/index", part, DocList[ImageInput], parameters):
                if doc.status == STATUS_INDEXED:
                    report.indexed.append(doc.uri)
                else:
                    report.failed.append((doc.uri, _reason(doc.error or "not indexed", doc.uri)))
        if retag:  # tags given for pictures already indexed: added to them, no embedding again
            for doc in self._post(self.index_address, "/update", retag, DocList[ImageInput]):
                if doc.status == STATUS_INDEXED:
                    report.tagged.append(doc.uri)
        return report

    def lookup(self, ids: Sequence[str]) -> DocList[KeyDoc]:
        if not ids:
            return DocList[KeyDoc]()
        return self._post(self.index_address, "/lookup", DocList[KeyDoc]([KeyDoc(id=i) for i in ids]), DocList[KeyDoc])

    def documents(self, page: int = 1000) -> Iterable[KeyDoc]:
        """Every stored document (id, uri, file facts), paged through ``/list`` in id order."""
        after = ""
        while True:
            batch = self._post(self.index_address, "/list", DocList[KeyDoc](), DocList[KeyDoc],
                               {"after_id": after, "page": page})
            if not len(batch):
                return
            yield from batch
            after = batch[-1].id

    def prune(self, roots: Sequence[str]) -> List[str]:
        """Remove the documents whose local file under one of ``roots`` is gone; returns their uris."""
        folders = [os.path.join(os.path.abspath(os.path.expanduser(r)), "") for r in roots if os.path.isdir(os.path.expanduser(r))]
        gone = []
        for doc in self.documents():
            path = local_path(doc.uri or "")
            if path and any(path.startswith(f) for f in folders) and not os.path.exists(path):
                gone.append(doc)
        for start in range(0, len(gone), 500):
            self.delete([d.id for d in gone[start : start + 500]])
        return [d.uri for d in gone]

    def duplicates(self, threshold: float = 0.95) -> List[List[Hit]]:
        """Groups of near-identical images in the index, largest first."""
        groups = self._post(self.index_address, "/duplicates", DocList[DuplicateGroup](), DocList[DuplicateGroup],
                            {"threshold": float(threshold)})
        return [list(g.members) for g in groups]

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed."""
        docs = self._post(self.index_address, "/delete", DocList[KeyDoc]([KeyDoc(id=i) for i in ids]), DocList[KeyDoc])
        return sum(1 for d in docs if d.found)

    def clear(self) -> IndexStatus:
        return self._post(self.index_address, "/clear", DocList[IndexStatus](), DocList[IndexStatus])[0]

    def status(self) -> IndexStatus:
        return self._post(self.index_address, "/status", DocList[IndexStatus](), DocList[IndexStatus])[0]

    # ---- search ------------------------------------------------------------------------
    def search(self, text: Optional[str] = None, *, limit: int = 10, min_score: Optional[float] = None,
               filter: Optional[Dict[str, Any]] = None, image: Optional[str] = None,
               plus: Sequence[str] = (), minus: Sequence[str] = (), like: Sequence[str] = (),
               unlike: Sequence[str] = (), weights: Optional[Dict[str, float]] = None,
               after: Optional[Union[str, float]] = None, before: Optional[Union[str, float]] = None,
               sort: str = "score", all_moments: bool = False) -> List[Hit]:
        """The ``limit`` best matching images, best first (``sort="date"``: the same hits, newest first).

        ``after`` / ``before`` (an ISO date or datetime, or seconds since the epoch) keep only pictures taken
        in that range (EXIF date, else the file's mtime), applied before the top ``limit`` like ``filter``.

        The query is a ``text`` and/or an ``image`` (path, URL or bytes), moved towards each
        text or image in ``plus`` and away from each in ``minus``, and refined with the ids of
        liked / disliked results (``like`` / ``unlike``; stored vectors, never re-embedded).
        ``weights`` may set ``query_weight``, ``like_weight``, ``unlike_weight``, ``plus_weight``
        and ``minus_weight``.

        A video gives at most its best moment per result list (a hit's uri ``video.mp4#t=12.5``, its time in
        ``t``); ``all_moments`` lists every matching moment instead.
        """
        if text is not None and not isinstance(text, str):
            raise TypeError(f"search() takes one text (str), got {type(text).__name__}; "
                            f"call it once per query, or use search_many() for a list")
        if sort not in ("score", "date"):
            raise ClipseekError(f"sort must be 'score' or 'date', got {sort!r}")
        query = self._query(text, image, plus, minus, weights or {})
        hits = self._search([query], limit, min_score, when_filter(filter, after, before), like, unlike, weights,
                            all_moments=all_moments)[0]
        return sorted(hits, key=lambda h: -(h.taken if h.taken is not None else float("-inf"))) if sort == "date" else hits

    def search_many(self, texts: Sequence[str], *, limit: int = 10, min_score: Optional[float] = None,
                    filter: Optional[Dict[str, Any]] = None) -> List[List[Hit]]:
        """One result list per text, in one request."""
        if isinstance(texts, str):
            raise TypeError("search_many() takes a list of texts; use search() for one text")
        return self._search([TextQuery(text=t) for t in texts], limit, min_score, filter, (), (), None)

    def classify(self, image: Union[str, bytes], labels: Sequence[str], *,
                 template: Optional[str] = None) -> List[Tuple[str, float]]:
        """Zero-shot labels for one image: (label, probability), most likely first."""
        labels = [label.strip() for label in labels if label and label.strip()]
        if not labels:
            raise ClipseekError("classify needs at least one label")
        query = TextQuery(parts=DocList[QueryPart]([QueryPart(text=label) for label in labels]))
        self._set_image(query, image)
        parameters = {"template": template} if template else {}
        answer = self._post(self.search_address, "/classify", DocList[TextQuery]([query]), DocList[TextQuery],
                            parameters)[0]
        if answer.error:
            raise ClipseekError(f"classify: {answer.error}")
        return [(m.id, m.score) for m in answer.matches]

    def _query(self, text, image, plus, minus, weights) -> TextQuery:
        query = TextQuery(text=text or None)
        parts = []
        if image is not None:
            if text:  # both: the image joins as a part with the query's weight
                parts.append(self._part(image, float(weights.get("query_weight", 1.0))))
            else:
                self._set_image(query, image)
        parts += [self._part(p, float(weights.get("plus_weight", 1.0))) for p in plus]
        parts += [self._part(m, -float(weights.get("minus_weight", 0.5))) for m in minus]
        query.parts = DocList[QueryPart](parts)
        return query

    def _part(self, item: Union[str, bytes], weight: float) -> QueryPart:
        part = QueryPart(weight=weight)
        if isinstance(item, bytes) or _looks_like_image(item):
            self._set_image(part, item)
        else:
            part.text = item
        return part

    def _set_image(self, doc, image: Union[str, bytes]) -> None:
        """An image query: bytes as they are; a local file by path (local server) or as bytes (remote)."""
        if isinstance(image, bytes):
            doc.bytes_ = image
            return
        path = local_path(image)
        if path is not None and not os.path.exists(path):
            raise ClipseekError(f"query image {image}: no such file")
        if path is not None and self.send_bytes:
            with open(path, "rb") as f:
                doc.bytes_ = f.read()
        else:
            doc.url = path_uri(os.path.abspath(path)) if path is not None else image

    def _search(self, queries, limit, min_score, filter, like, unlike, weights,
                all_moments: bool = False) -> List[List[Hit]]:
        parameters: Dict[str, Any] = {"limit": int(limit)}
        if all_moments:
            parameters["all_moments"] = True
        if min_score is not None:
            parameters["min_score"] = float(min_score)
        if filter:
            parameters["filter"] = filter
        if like:
            parameters["like"] = list(like)
        if unlike:
            parameters["unlike"] = list(unlike)
        for key in ("query_weight", "like_weight", "unlike_weight"):
            if weights and key in weights:
                parameters[key] = float(weights[key])
        # A query without any image skips the search flow's image encoder: one gRPC hop less.
        target = None if any(_has_image(q) for q in queries) else TEXT_ONLY_ROUTE
        answers = self._post(self.search_address, "/search", DocList[TextQuery](queries), DocList[TextQuery], parameters,
                             target_executor=target)
        results = []
        for answer in answers:
            if answer.error:
                label = answer.text[:60] if answer.text else "query"
                raise ClipseekError(f"search {label!r}: {answer.error}")
            results.append(list(answer.matches))
        return results


def _has_image(query: TextQuery) -> bool:
    """The query or one of its parts carries an image."""
    return has_image(query) or any(has_image(part) for part in (query.parts or []))


def _split_by_bytes(docs, max_bytes: int) -> Iterable:
    """``docs`` in consecutive DocLists whose image bytes stay under ``max_bytes`` (one document at least each)."""
    part, size = DocList[ImageInput](), 0
    for doc in docs:
        n = len(doc.bytes_ or b"")
        if len(part) and size + n > max_bytes:
            yield part
            part, size = DocList[ImageInput](), 0
        part.append(doc)
        size += n
    if len(part):
        yield part


def _looks_like_image(item: str) -> bool:
    """A plus/minus part names an image when it is a URL or data URI, or an existing image file."""
    if item.startswith(URL_PREFIXES):
        return True
    path = os.path.expanduser(item)
    return is_image_file(path) and os.path.exists(path)


def _unchanged(known: KeyDoc, path: Optional[str], st: Optional[os.stat_result]) -> bool:
    """Same size and mtime, or same size and the same content: nothing to re-embed."""
    if path is None or st is None:
        return True  # URLs and data URIs already indexed stay as they are unless forced
    if known.size != st.st_size:
        return False
    if known.mtime is not None and abs(known.mtime - st.st_mtime) < 1e-6:
        return True
    try:
        with open(path, "rb") as f:
            return known.content_hash == content_hash(f.read())
    except OSError:
        return False


def _reason(error: str, source: Optional[str]) -> str:
    """The cause without the source repeated in front of it."""
    if source and error.startswith(f"{source}: "):
        return error[len(source) + 2 :]
    return error
