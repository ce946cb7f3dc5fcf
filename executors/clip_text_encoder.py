"""CLIPTextEncoder: text documents -> float32 L2-normalized CLIP embeddings."""


import logging
from typing import Dict, Optional

from docarray import DocList
from jina import Executor, requests

from executors.models.loading import (batched, check_positive_int, default_model, load_clip, on_model_thread_async,
                                      text_embeddings)
from executors.docs import TextQuery
from executors.params import as_text, at_most_default, request_options, traverse

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 10_000
# What a request's parameters may set; the model, device and precision are fixed when the server starts.
REQUEST_OPTIONS = {"batch_size": at_most_default(), "access_paths": as_text(200), "max_length": at_most_default(),
                   "template": as_text(1000)}


class CLIPTextEncoder(Executor):
    """Embeds texts with the text tower of a CLIP or SigLIP model: at most ``max_length`` tokens
    (77 for CLIP, the text tower's length if shorter: 64 for SigLIP), truncated, padded as the model
    was trained: to the longest text of the batch (CLIP), to the text tower's full length (SigLIP).

    The query's weighted ``parts`` with a text are embedded too. A document without text (an
    image query, or an empty one) and one that already carries an embedding are left as they are.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: int = 64,
        dtype: Optional[str] = None,
        access_paths: str = "@r",
        max_length: int = 77,
        template: str = "a photo of a {}",
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
            template=template,
        )
        self._load(self.defaults)

    def _load(self, options):
        return load_clip(options["pretrained_model_name_or_path"], options["device"], options["dtype"], with_tokenizer=True)

    # The endpoints are coroutines that hand the whole request to the model thread (on_model_thread_async);
    # ``encode`` and ``encode_labels`` are the same work called directly.
    @requests(on="/search")
    async def serve_search(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None,
                           **kwargs) -> DocList[TextQuery]:
        return await on_model_thread_async(self.encode, docs, parameters)

    @requests(on="/classify")
    async def serve_classify(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None,
                             **kwargs) -> DocList[TextQuery]:
        return await on_model_thread_async(self.encode_labels, docs, parameters)

    def encode(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        """Embeds the queries' texts and their parts' texts in place; returns ``docs``."""
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        targets = []
        for doc in traverse(docs, options["access_paths"]):
            for item in [doc, *(getattr(doc, "parts", None) or [])]:
                text = (item.text or "").strip()
                if item.embedding is None and text:  # no text: an image query, or an empty one the indexer answers
                    targets.append((item, text[:MAX_QUERY_CHARS]))
        self._embed(targets, options)
        return docs

    def encode_labels(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        """Zero-shot labels: each query's ``parts`` are label names, embedded as ``template.format(label)``."""
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        template = str(options["template"])
        if "{}" not in template:
            for doc in docs:
                doc.error = f"template {template!r} has no {{}} for the label"
            return docs
        targets = [(part, template.format(part.text.strip())[:MAX_QUERY_CHARS])
                   for doc in docs for part in doc.parts if (part.text or "").strip()]
        self._embed(targets, options)
        return docs

    def _embed(self, targets, options) -> None:
        clip = self._load(options)
        for batch in batched(targets, check_positive_int("batch_size", options["batch_size"])):
            vectors = text_embeddings(clip, [text for _, text in batch], max_length=options["max_length"])
            for (doc, _), vector in zip(batch, vectors):
                doc.embedding = vector
                doc.embedding_model = clip.name
        logger.debug("encoded %d texts", len(targets))
