"""Document schemas: the contract between clients and the executors.

Built on docarray's standard ``ImageDoc`` and ``TextDoc`` so any jina ``Client`` can post
plain docarray documents; clipseek's own fields sit beside the standard ones. This
module imports no torch, so clients and the CLI can use it without loading a model.
"""


from typing import Any, Dict, Optional, Tuple, Type

from docarray import BaseDoc, DocList
from docarray.base_doc.mixins.io import _type_to_protobuf
from docarray.documents import ImageDoc, TextDoc
from docarray.proto import DocProto, NodeProto
from docarray.typing import AnyEmbedding, AnyTensor, AnyUrl, ImageUrl
from pydantic import Field

from executors.images.imaging import IMAGE_EXTENSIONS
from executors.images.video import VIDEO_EXTENSIONS

STATUS_INDEXED = "indexed"
STATUS_UNCHANGED = "unchanged"
STATUS_FAILED = "failed"


_SCALAR_KEYS = {str: "text", float: "float", int: "integer", bool: "boolean", bytes: "blob"}
_PLAIN_CONTENT = frozenset(("text", "float", "integer", "boolean", "blob"))
_ANNOTATIONS: Dict[Tuple[type, str], Type] = {}
_FIELD_NAMES: Dict[type, frozenset] = {}


class FastProto:
    """docarray's protobuf wire format, written and read without its per-field generic dispatch.

    docarray resolves every field's annotation again for every document it reads (``typing_inspect``
    walks the ``Optional``) and builds a pydantic ``TypeAdapter`` for every ``id``; writing, it tries
    each field against torch, numpy and six Python types. For a search answer of ten hits that is
    ~1.5 ms to write and ~2.8 ms to read, on every hop of the flow and in the client. Here scalars and
    ids take a direct path and annotations and field names are looked up once per class (docarray asks
    pydantic for all of a class's fields again for each field it reads); everything else (tensors,
    nested documents, lists, dicts) goes through docarray's own code, so the bytes on the wire are
    docarray's and any docarray reader (a plain jina ``Client``) reads them.
    """

    @classmethod
    def _get_field_annotation(cls, field: str) -> Type:
        key = (cls, field)
        annotation = _ANNOTATIONS.get(key)
        if annotation is None:
            annotation = _ANNOTATIONS[key] = super()._get_field_annotation(field)
        return annotation

    @classmethod
    def from_protobuf(cls, pb_msg: DocProto):
        """As docarray's ``from_protobuf``: fields the class does not have are skipped (unless the class
        loads extra fields), the rest read and validated by the class as docarray does."""
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(cls._docarray_fields())
        extra = bool(cls.model_config.get("_load_extra_fields_from_protobuf"))
        fields = {name: cls._get_content_from_node_proto(value, name)
                  for name, value in pb_msg.data.items() if extra or name in names}
        return cls(**fields)

    @classmethod
    def _get_content_from_node_proto(cls, value: NodeProto, field_name=None, field_type=None) -> Any:
        content = value.WhichOneof("content")
        if content is None:
            return None
        if value.WhichOneof("docarray_type") is None:
            if content in _PLAIN_CONTENT:
                return getattr(value, content)
        elif value.type == "id" and content == "text":
            return value.text  # validated into docarray's ID when the document is built
        return super()._get_content_from_node_proto(value, field_name, field_type)

    def to_protobuf(self) -> DocProto:
        data = {}
        for field, value in self:
            if value is None:
                data[field] = NodeProto()
                continue
            key = _SCALAR_KEYS.get(type(value))
            if key is not None:
                data[field] = NodeProto(**{key: value})
                continue
            try:
                data[field] = _type_to_protobuf(value)
            except Exception as ex:
                if ex.args:
                    ex.args = (f"Field `{field}` is problematic",) + ex.args
                raise
        return DocProto(data=data)


class MediaUrl(AnyUrl):
    """The url of a picture, or of a video or camera RAW file: docarray's ``ImageUrl`` refuses any extension
    whose mime type is not an image's. It travels as an ``any_url``, which every docarray reads (a plain
    ``ImageDoc``'s ``image_url`` is taken too)."""

    @classmethod
    def mime_type(cls) -> str:
        return "image"

    @classmethod
    def extra_extensions(cls):
        return [e.lstrip(".") for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS]


class VideoMoment(FastProto, BaseDoc):
    """One moment of a video: its time in seconds and the embedding of its frame."""

    t: float = 0.0
    embedding: Optional[AnyEmbedding] = None


class ImageInput(FastProto, ImageDoc):
    """An image to index or to search by: ``url`` (path, file://, http(s)://, data:),
    ``bytes_`` (encoded file) or ``tensor`` (decoded HxWxC array). A video file to index arrives the
    same way; the image encoder gives it ``moments`` (one embedding per kept frame, each with its time)
    instead of one ``embedding``, and the index stores each moment as an entry of that video."""

    url: Optional[MediaUrl] = None
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
    # when and where the picture was taken, from its EXIF (taken_from: "DateTimeOriginal", "DateTime", or
    # "mtime" when the file's modification time stands in); seconds since the epoch, degrees
    taken: Optional[float] = None
    taken_from: Optional[str] = None
    camera: Optional[str] = None
    latitude: Optional[float] = None
    longitude: Optional[float] = None
    moments: DocList[VideoMoment] = Field(default_factory=DocList[VideoMoment])
    duration: Optional[float] = None  # seconds, for a video


class Hit(FastProto, BaseDoc):
    """One search result. A moment of a video has the video's uri with a Media Fragments suffix
    (``video.mp4#t=12.5``) and its time in seconds as ``t``."""

    uri: Optional[str] = None
    score: float = 0.0
    tags: Dict[str, Any] = {}
    width: Optional[int] = None
    height: Optional[int] = None
    mtime: Optional[float] = None
    size: Optional[int] = None
    taken: Optional[float] = None
    taken_from: Optional[str] = None
    camera: Optional[str] = None
    latitude: Optional[float] = None
    longitude: Optional[float] = None
    t: Optional[float] = None


class QueryPart(FastProto, BaseDoc):
    """One more part of a query, added with its ``weight`` (negative to move away from it):
    a ``text``, or an image as ``url`` / ``bytes_`` / ``tensor``."""

    text: Optional[str] = None
    url: Optional[str] = None
    bytes_: Optional[bytes] = None
    tensor: Optional[AnyTensor] = None
    weight: float = 1.0
    embedding: Optional[AnyEmbedding] = None
    embedding_model: Optional[str] = None
    error: Optional[str] = None


class TextQuery(FastProto, TextDoc):
    """A query: a ``text``, or an image (``url`` / ``bytes_`` / ``tensor``), plus optional weighted
    ``parts``; the answer comes back in ``matches``. Liked and disliked results are named by id in
    the request parameters ``like`` / ``unlike``."""

    url: Optional[ImageUrl] = None  # the query image (TextDoc's url would only take text files)
    tensor: Optional[AnyTensor] = None
    parts: DocList[QueryPart] = Field(default_factory=DocList[QueryPart])
    matches: DocList[Hit] = Field(default_factory=DocList[Hit])
    embedding_model: Optional[str] = None
    error: Optional[str] = None


def has_image(item) -> bool:
    """Whether a query (or one of its parts) carries an image: a ``url``, ``bytes_`` or ``tensor``."""
    return bool(item.url or item.bytes_ or item.tensor is not None)


class DuplicateGroup(FastProto, BaseDoc):
    """Near-identical images: each member with its best cosine to another member."""

    members: DocList[Hit] = Field(default_factory=DocList[Hit])


class KeyDoc(FastProto, BaseDoc):
    """A document id with the file facts stored for it (answer of ``/lookup``)."""

    uri: Optional[str] = None
    content_hash: Optional[str] = None
    mtime: Optional[float] = None
    size: Optional[int] = None
    found: bool = False
    t: Optional[float] = None  # a moment of a video: its time in seconds (``uri`` is the video's)


class IndexStatus(FastProto, BaseDoc):
    """What ``/status`` reports about an index."""

    count: int = 0
    dim: Optional[int] = None
    model: Optional[str] = None
    bytes_on_disk: int = 0
    schema_version: int = 0
    path: Optional[str] = None
