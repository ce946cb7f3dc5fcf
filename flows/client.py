"""A thin typed client for the index and search flows, over jina's gRPC Client.

    from flows.client import ClipseekClient
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
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from docarray import DocList

from executors.docs import STATUS_FAILED, STATUS_INDEXED, Hit, ImageInput, IndexStatus, KeyDoc, TextQuery
from executors.imaging import content_hash, is_image_file, local_path, uri_id
from flows.settings import Settings

logger = logging.getLogger(__name__)

URL_PREFIXES = ("http://", "https://", "file://", "data:")


class ClipseekError(RuntimeError):
    """A request the flows could not answer; the message says which and why."""


@dataclass
class IndexReport:
    indexed: List[str] = field(default_factory=list)
    unchanged: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def merge(self, other: "IndexReport") -> None:
        self.indexed += other.indexed
        self.unchanged += other.unchanged
        self.failed += other.failed


def expand_sources(items: Iterable[str], report: Optional[IndexReport] = None) -> List[str]:
    """Folders (recursively, image extensions only), globs, files and URLs -> a list of sources.
    A path that matches nothing is recorded as failed in ``report``."""
    out: List[str] = []
    seen = set()

    def add(source: str) -> None:
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
                    if is_image_file(name):
                        add(os.path.abspath(os.path.join(root, name)))
        elif os.path.isfile(path):
            add(os.path.abspath(path))
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) and is_image_file(p))
            if not matches and report is not None:
                report.failed.append((item, "the pattern matches no image files"))
            for match in matches:
                add(os.path.abspath(match))
        elif report is not None:
            report.failed.append((item, "no such file or directory"))
    return out


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
        self._clients: Dict[str, Any] = {}

    # ---- transport ---------------------------------------------------------------------
    def _client(self, address: str):
        if address not in self._clients:
            from jina import Client

            self._clients[address] = Client(host=address)
        return self._clients[address]

    def _post(self, address: str, endpoint: str, docs, return_type, parameters: Optional[dict] = None):
        """The one place requests go out; transport errors become ClipseekError."""
        try:
            return self._client(address).post(
                endpoint, inputs=docs, parameters=parameters or {}, return_type=return_type,
                request_size=max(1, len(docs)) if docs is not None else 1, timeout=self.timeout,
            )
        except ConnectionError as e:
            raise ClipseekError(f"cannot reach {address}{endpoint}: is `clipseek serve` running? ({e})") from None
        except Exception as e:  # jina raises BadServer and grpc errors with long bodies
            raise ClipseekError(f"{address}{endpoint} failed: {_short_error(e)}") from None

    # ---- index -------------------------------------------------------------------------
    def index(self, sources: Iterable[str], *, batch_size: int = 64, tags: Optional[Dict[str, Any]] = None,
              force: bool = False, parameters: Optional[dict] = None,
              progress: Optional[Callable[[int], None]] = None) -> IndexReport:
        """Index files, folders, globs and URLs; unchanged files are skipped unless ``force``.

        ``progress(n)`` is called after each batch with the number of sources it handled.
        """
        if isinstance(sources, (str, bytes, os.PathLike)):
            sources = [os.fspath(sources)]
        report = IndexReport()
        expanded = expand_sources(sources, report)
        for start in range(0, len(expanded), batch_size):
            batch = expanded[start : start + batch_size]
            report.merge(self._index_batch(batch, tags=tags, force=force, parameters=parameters))
            if progress:
                progress(len(batch))
        return report

    def _index_batch(self, sources: Sequence[str], *, tags, force, parameters) -> IndexReport:
        report = IndexReport()
        ids = {source: uri_id(source) for source in sources}
        stored = {} if force else {d.id: d for d in self.lookup(list(ids.values())) if d.found}
        docs = DocList[ImageInput]()
        for source in sources:
            known = stored.get(ids[source])
            path = local_path(source)
            try:
                st = os.stat(path) if path is not None else None
            except OSError as e:
                report.failed.append((source, f"cannot read ({e.strerror})"))
                continue
            if known is not None and _unchanged(known, path, st):
                report.unchanged.append(source)
                continue
            doc = ImageInput(id=ids[source], uri=source, tags=dict(tags or {}))
            if path is not None and self.send_bytes:
                try:
                    with open(path, "rb") as f:
                        doc.bytes_ = f.read()
                except OSError as e:
                    report.failed.append((source, f"cannot read ({e.strerror})"))
                    continue
                doc.mtime, doc.size = st.st_mtime, st.st_size
            else:
                doc.url = source
            docs.append(doc)
        if docs:
            for doc in self._post(self.index_address, "/index", docs, DocList[ImageInput], parameters):
                if doc.status == STATUS_INDEXED:
                    report.indexed.append(doc.uri)
                else:
                    report.failed.append((doc.uri, _reason(doc.error or "not indexed", doc.uri)))
        return report

    def lookup(self, ids: Sequence[str]) -> DocList[KeyDoc]:
        if not ids:
            return DocList[KeyDoc]()
        return self._post(self.index_address, "/lookup", DocList[KeyDoc]([KeyDoc(id=i) for i in ids]), DocList[KeyDoc])

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed."""
        docs = self._post(self.index_address, "/delete", DocList[KeyDoc]([KeyDoc(id=i) for i in ids]), DocList[KeyDoc])
        return sum(1 for d in docs if d.found)

    def clear(self) -> IndexStatus:
        return self._post(self.index_address, "/clear", DocList[IndexStatus](), DocList[IndexStatus])[0]

    def status(self) -> IndexStatus:
        return self._post(self.index_address, "/status", DocList[IndexStatus](), DocList[IndexStatus])[0]

    # ---- search ------------------------------------------------------------------------
    def search(self, text: str, *, limit: int = 10, min_score: Optional[float] = None,
               filter: Optional[Dict[str, Any]] = None) -> List[Hit]:
        """The ``limit`` best matching images for ``text``, best first."""
        if not isinstance(text, str):
            raise TypeError(f"search() takes one text (str), got {type(text).__name__}; "
                            f"call it once per query, or use search_many() for a list")
        return self.search_many([text], limit=limit, min_score=min_score, filter=filter)[0]

    def search_many(self, texts: Sequence[str], *, limit: int = 10, min_score: Optional[float] = None,
                    filter: Optional[Dict[str, Any]] = None) -> List[List[Hit]]:
        if isinstance(texts, str):
            raise TypeError("search_many() takes a list of texts; use search() for one text")
        parameters: Dict[str, Any] = {"limit": int(limit)}
        if min_score is not None:
            parameters["min_score"] = float(min_score)
        if filter:
            parameters["filter"] = filter
        docs = DocList[TextQuery]([TextQuery(text=t) for t in texts])
        answers = self._post(self.search_address, "/search", docs, DocList[TextQuery], parameters)
        results = []
        for answer in answers:
            if answer.error:
                raise ClipseekError(f"search {answer.text[:60]!r}: {answer.error}")
            results.append(list(answer.matches))
        return results


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


def _short_error(error: Exception) -> str:
    header = getattr(error, "args", [None])[0]
    description = getattr(getattr(header, "status", None), "description", None)
    if description:
        return str(description).splitlines()[0]
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
