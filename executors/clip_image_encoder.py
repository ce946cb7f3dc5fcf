"""CLIPImageEncoder: image documents -> float32 L2-normalized CLIP embeddings."""


import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, Optional

import numpy as np
from docarray import DocList
from jina import Executor, requests

from executors.clip_model import batched, check_positive_int, default_model, image_embeddings, load_clip
from executors.docs import STATUS_FAILED, ImageInput
from executors.imaging import ImageError, Preprocess, SourceInfo, array_to_image, decode_image, preprocess, read_source
from executors.params import request_options, traverse

logger = logging.getLogger(__name__)


def prepare(doc: ImageInput, recipe: Preprocess, *, url_timeout: float, max_bytes: int, draft: bool):
    """One document -> (pixel array, width, height, source info or None). Raises ImageError."""
    info: Optional[SourceInfo] = None
    name = doc.uri or (str(doc.url) if doc.url else f"document {doc.id}")
    draft_size = recipe.shortest_edge if draft else None
    if doc.tensor is not None:
        img = array_to_image(np.asarray(doc.tensor), name)
    elif doc.bytes_:
        info = SourceInfo(uri=name, data=bytes(doc.bytes_))
        img = decode_image(info.data, name, draft_size=draft_size)
    elif doc.url:
        info = read_source(str(doc.url), timeout=url_timeout, max_bytes=max_bytes)
        img = decode_image(info.data, name, draft_size=draft_size)
    else:
        raise ImageError(f"{name}: has no url, bytes_ or tensor to read an image from")
    width, height = img.size
    return preprocess(img, recipe), width, height, info


def prefetch(pool: ThreadPoolExecutor, fn, items, window: int) -> Iterator:
    """``fn`` over ``items`` in the pool, at most ``window`` ahead, results (or exceptions) in order."""
    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        future = pending.popleft()
        for item in it:
            pending.append(pool.submit(fn, item))
            break
        try:
            yield future.result()
        except Exception as e:  # handed to the caller, attached to that one document
            yield e


class CLIPImageEncoder(Executor):
    """Embeds images with a transformers ``CLIPModel``.

    Every constructor argument is a default that a request may override under the same
    name in ``parameters``. A document that cannot be read or decoded gets ``status``
    ``failed`` and an ``error`` naming it; the rest of the batch is embedded.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: int = 32,
        dtype: str = "float32",
        access_paths: str = "@r",
        num_workers: Optional[int] = None,
        draft_decode: bool = False,
        url_timeout: float = 10.0,
        max_download_bytes: int = 50 * 2**20,
        keep_pixels: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.defaults = dict(
            pretrained_model_name_or_path=pretrained_model_name_or_path or default_model(),
            device=device,
            batch_size=check_positive_int("batch_size", batch_size),
            dtype=dtype,
            access_paths=access_paths,
            draft_decode=bool(draft_decode),
            url_timeout=float(url_timeout),
            max_download_bytes=int(max_download_bytes),
            keep_pixels=bool(keep_pixels),
        )
        workers = num_workers or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipseek-decode")
        self._load(self.defaults)

    def _load(self, options):
        return load_clip(options["pretrained_model_name_or_path"], options["device"], options["dtype"])

    @requests(on="/index")
    def encode(self, docs: DocList[ImageInput], parameters: Optional[Dict] = None, **kwargs) -> DocList[ImageInput]:
        options = request_options(self.defaults, parameters)
        batch_size = check_positive_int("batch_size", options["batch_size"])
        clip = self._load(options)
        recipe = Preprocess.from_processor_config(clip.processor_config)
        targets = [d for d in traverse(docs, options["access_paths"]) if d.embedding is None]

        def work(doc):
            return prepare(doc, recipe, url_timeout=options["url_timeout"],
                           max_bytes=options["max_download_bytes"], draft=options["draft_decode"])

        timings = {"prepare_wait": 0.0, "model": 0.0}
        results = prefetch(self._pool, work, targets, window=2 * batch_size)
        failed = 0
        for batch in batched(targets, batch_size):
            ready, arrays = [], []
            t0 = time.perf_counter()
            for doc in batch:
                result = next(results)
                if isinstance(result, Exception):
                    failed += 1
                    doc.status, doc.error = STATUS_FAILED, _describe(result)
                    logger.warning("skipped %s", doc.error)
                    continue
                pixels, width, height, info = result
                doc.width, doc.height = width, height
                if info is not None:
                    doc.uri = doc.uri or info.uri
                    doc.content_hash = info.content_hash
                    doc.size = info.size
                    doc.mtime = doc.mtime if info.mtime is None else info.mtime
                ready.append(doc)
                arrays.append(pixels)
            t1 = time.perf_counter()
            if ready:
                vectors = image_embeddings(clip, np.stack(arrays))
                for doc, vector in zip(ready, vectors):
                    doc.embedding = vector
                    doc.embedding_model = clip.name
                    doc.error = None
                    if not options["keep_pixels"]:
                        doc.tensor, doc.bytes_ = None, None
            timings["prepare_wait"] += t1 - t0
            timings["model"] += time.perf_counter() - t1
        logger.info("encoded %d images (%d failed): waited %.3f s for pixels, %.3f s in the model",
                    len(targets) - failed, failed, timings["prepare_wait"], timings["model"])
        return docs

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def _describe(error: Exception) -> str:
    if isinstance(error, ImageError):
        return str(error)
    return f"{type(error).__name__}: {error}"
