"""CLIPTextEncoder: text documents -> float32 L2-normalized CLIP embeddings."""


import logging
from typing import Dict, Optional

from docarray import DocList
from jina import Executor, requests

from executors.clip_model import batched, check_positive_int, default_model, load_clip, text_embeddings
from executors.docs import TextQuery
from executors.params import request_options, traverse

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000


class CLIPTextEncoder(Executor):
    """Embeds texts with a transformers ``CLIPModel``: at most ``max_length`` tokens
    (77 for CLIP), truncated, padded to the longest text of the batch.

    A document with an empty text gets an ``error`` and no embedding; a document that
    already carries an embedding is left as it is.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: int = 64,
        dtype: str = "float32",
        access_paths: str = "@r",
        max_length: int = 77,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.defaults = dict(
            pretrained_model_name_or_path=pretrained_model_name_or_path or default_model(),
            device=device,
            batch_size=check_positive_int("batch_size", batch_size),
            dtype=dtype,
            access_paths=access_paths,
            max_length=check_positive_int("max_length", max_length),
        )
        self._load(self.defaults)

    def _load(self, options):
        return load_clip(options["pretrained_model_name_or_path"], options["device"], options["dtype"], with_tokenizer=True)

    @requests(on="/search")
    def encode(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        options = request_options(self.defaults, parameters)
        clip = self._load(options)
        targets = []
        for doc in traverse(docs, options["access_paths"]):
            if doc.embedding is not None:
                continue
            text = (doc.text or "").strip()
            if not text:
                doc.error = "empty query: give some text to search for"
                continue
            targets.append((doc, text[:MAX_QUERY_CHARS]))
        for batch in batched(targets, check_positive_int("batch_size", options["batch_size"])):
            vectors = text_embeddings(clip, [text for _, text in batch], max_length=options["max_length"])
            for (doc, _), vector in zip(batch, vectors):
                doc.embedding = vector
                doc.embedding_model = clip.name
        logger.debug("encoded %d texts", len(targets))
        return docs
