"""Document schemas: the contract between clients and the executors.

Built on docarray's standard ``ImageDoc`` and ``TextDoc`` so any jina ``Client`` can post
plain docarray documents; clipseek's own fields sit beside the standard ones. This
module imports no torch, so clients and the CLI can use it without loading a model.
"""


from typing import Any, Dict, Optional

from docarray import BaseDoc, DocList
from docarray.documents import ImageDoc, TextDoc

STATUS_INDEXED = "indexed"
STATUS_UNCHANGED = "unchanged"
STATUS_FAILED = "failed"


class ImageInput(ImageDoc):
    """An image to index or to search by: ``url`` (path, file://, http(s)://, data:),
    ``bytes_`` (encoded file) or ``tensor`` (decoded HxWxC array)."""

    uri: Optional[str] = None  # what a person sees for this image (path or URL)
    tags: Dict[str, Any] = {}
    content_hash: Optional[str] = None
    mtime: Optional[float] = None
    size: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    embedding_model: Optional[str] = None
    status: Optional[str] = None
    error: Optional[str] = None


class Hit(BaseDoc):
    """One search result."""

    uri: Optional[str] = None
    score: float = 0.0
    tags: Dict[str, Any] = {}
    width: Optional[int] = None
    height: Optional[int] = None
    mtime: Optional[float] = None
    size: Optional[int] = None


class TextQuery(TextDoc):
    """A text to embed and search with; the answer comes back in ``matches``."""

    matches: DocList[Hit] = DocList[Hit]()
    embedding_model: Optional[str] = None
    error: Optional[str] = None


class KeyDoc(BaseDoc):
    """A document id with the file facts stored for it (answer of ``/lookup``)."""

    uri: Optional[str] = None
    content_hash: Optional[str] = None
    mtime: Optional[float] = None
    size: Optional[int] = None
    found: bool = False


class IndexStatus(BaseDoc):
    """What ``/status`` reports about an index."""

    count: int = 0
    dim: Optional[int] = None
    model: Optional[str] = None
    bytes_on_disk: int = 0
    schema_version: int = 0
    path: Optional[str] = None
