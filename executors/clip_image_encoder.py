"""CLIPImageEncoder: image documents -> float32 L2-normalized CLIP embeddings."""


import logging
import os
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from docarray import DocList
from jina import Executor, requests

from executors.models.loading import (batched, batches_ahead, check_positive_int, default_model, image_streams,
                                      load_clip, submit_image_embeddings)
from executors.docs import STATUS_FAILED, Hit, ImageInput, TextQuery, VideoMoment, has_image
from executors.images.imaging import (ImageError, PhotoFacts, Preprocess, SourceInfo, array_to_image, decode_image,
                                      local_path, path_uri, preprocess, read_source)
from executors.images.video import (DEFAULT_MAX_MOMENTS, DEFAULT_SPACING, MAX_VIDEO_BYTES, is_video_file, looks_like_video,
                                    video_moments)
from executors.params import as_bool, as_flag, as_float, as_text, at_most_default, request_options, traverse, worker_threads

logger = logging.getLogger(__name__)

# What a request's parameters may set; the model, device, precision and every read limit are fixed at start.
VIDEO_SPACING = as_float(0.5, 3600.0)  # seconds between moments a server or a request may ask for
REQUEST_OPTIONS = {"batch_size": at_most_default(), "access_paths": as_text(200), "draft_decode": as_bool,
                   "keep_pixels": as_bool, "video_spacing": VIDEO_SPACING, "max_moments": at_most_default()}

# With draft decoding a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose short side is
# still at least DRAFT_FACTOR times the model's resize target, so the bicubic resize that follows
# still shrinks the picture at least this much (benchmarks/index_throughput.py measures what it costs).
DRAFT_FACTOR = 2


@dataclass
class VideoOptions:
    """How a video becomes moments (executors/images/video.py): at least one every ``spacing`` seconds, at
    most ``max_moments``; a video file may be up to ``max_bytes`` (a picture: the encoder's own cap)."""

    spacing: float = DEFAULT_SPACING
    max_moments: int = DEFAULT_MAX_MOMENTS
    max_bytes: int = MAX_VIDEO_BYTES


def prepare(doc: ImageInput, recipe: Preprocess, *, url_timeout: float, max_bytes: int, draft: bool,
            max_megapixels: Optional[float] = None,
            timings: Optional[Dict[str, float]] = None, allow_private_urls: bool = False,
            allowed_roots: Optional[Sequence[str]] = None, video: Optional[VideoOptions] = None):
    """One document -> (pixels, width, height, source info or None, times). Raises ImageError.

    A picture gives one pixel array (C, H, W) and ``times`` None; a video file (by its name's extension
    or its bytes), when ``video`` options are given, gives a stack (N, C, H, W) of its moments and their
    times in seconds. Without ``video`` a video is refused (a query is a picture).
    ``timings``, if given, gets the seconds spent reading, decoding and preprocessing added to it
    (the original width and height are reported even when the JPEG was decoded at a reduced scale).
    """
    info: Optional[SourceInfo] = None
    name = getattr(doc, "uri", None) or (str(doc.url) if doc.url else f"document {doc.id}")
    draft_size = recipe.shortest_edge * DRAFT_FACTOR if draft else None
    named_video = is_video_file(urllib.parse.urlsplit(str(doc.url or name)).path)
    t0 = time.perf_counter()
    if doc.tensor is not None:
        t1 = t0
        img = array_to_image(np.asarray(doc.tensor), name)
    elif doc.bytes_ or doc.url:
        if doc.bytes_:
            info = SourceInfo(uri=name, data=bytes(doc.bytes_))
        else:
            cap = max(max_bytes, video.max_bytes) if video is not None and named_video else max_bytes
            info = read_source(str(doc.url), timeout=url_timeout, max_bytes=cap,
                               allow_private=allow_private_urls, allowed_roots=allowed_roots)
        t1 = time.perf_counter()
        if named_video or looks_like_video(info.data):
            return _prepare_video(info, name, recipe, video, t0, t1, timings)
        img = decode_image(info.data, name, draft_size=draft_size, max_megapixels=max_megapixels)
    else:
        raise ImageError(f"{name}: has no url, bytes_ or tensor to read an image from")
    width, height = getattr(img, "original_size", None) or img.size
    if info is not None:
        info.facts = getattr(img, "photo_facts", None)
    t2 = time.perf_counter()
    pixels = preprocess(img, recipe)
    _add_timings(timings, t0, t1, t2)
    return pixels, width, height, info, None


def _add_timings(timings: Optional[Dict[str, float]], t0: float, t1: float, t2: float) -> None:
    """Add to ``timings`` the seconds spent reading (t0 to t1), decoding (t1 to t2) and preprocessing (since t2)."""
    if timings is not None:
        t3 = time.perf_counter()
        for stage, seconds in (("read", t1 - t0), ("decode", t2 - t1), ("preprocess", t3 - t2)):
            timings[stage] = timings.get(stage, 0.0) + seconds


def _prepare_video(info: SourceInfo, name: str, recipe: Preprocess, video: Optional[VideoOptions], t0: float,
                   t1: float, timings: Optional[Dict[str, float]]):
    """``prepare`` for a video file: its moments, each preprocessed like a picture."""
    if video is None:
        raise ImageError(f"{name}: is a video; a query or a label needs a picture (one frame of it)")
    found = video_moments(info.data, name, spacing=video.spacing, max_moments=video.max_moments,
                          short_side=recipe.shortest_edge * DRAFT_FACTOR)
    info.facts = PhotoFacts(taken=found.created, taken_from="creation_time") if found.created else None
    info.data = b""  # the moments are decoded: the file's bytes need not wait for the model
    t2 = time.perf_counter()
    pixels = np.stack([preprocess(m.image, recipe) for m in found.moments])
    _add_timings(timings, t0, t1, t2)
    return pixels, found.width, found.height, info, [m.t for m in found.moments]


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

    A request's ``parameters`` may set only ``REQUEST_OPTIONS`` (a smaller ``batch_size``, ``access_paths``,
    ``draft_decode``, ``keep_pixels``); one naming the model, device, dtype or a read limit is refused
    (executors/params.py). ``draft_decode`` (on by default) decodes big JPEGs at a reduced
    scale that still leaves DRAFT_FACTOR times the model's input size; benchmarks/index_throughput.py
    measures its speed and that embeddings stay within a cosine of 1e-5 of a full decode. A document that cannot be read or decoded gets ``status``
    ``failed`` and an ``error`` naming it; the rest of the batch is embedded. ``model_streams``: on a CPU, into
    how many parts a batch is split to run side by side, each on its share of the torch threads (None: one per
    thread, at most 8; 1: the whole batch on every thread; ``executors.models.loading.submit_image_embeddings``).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: int = 32,
        dtype: Optional[str] = None,
        access_paths: str = "@r",
        num_workers: Optional[int] = None,
        model_streams: Optional[int] = None,
        draft_decode: bool = True,
        url_timeout: float = 10.0,
        max_download_bytes: int = 50 * 2**20,
        keep_pixels: bool = False,
        allow_private_urls: bool = False,
        allowed_roots: Optional[Sequence[str]] = None,
        max_megapixels: Optional[float] = 100.0,
        video_spacing: float = DEFAULT_SPACING,
        max_moments: int = DEFAULT_MAX_MOMENTS,
        max_video_bytes: int = MAX_VIDEO_BYTES,
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
            max_megapixels=max_megapixels,
            video_spacing=VIDEO_SPACING(video_spacing, None),
            max_moments=check_positive_int("max_moments", max_moments),
        )
        self.max_video_bytes = int(max_video_bytes)
        # Not request options: a client must not widen the folders or the networks the server reads from.
        self.allowed_roots = _roots(allowed_roots)
        self.allow_private_urls = as_flag(allow_private_urls, "allow_private_urls")
        workers = num_workers or worker_threads()
        self.model_streams = None if model_streams is None else check_positive_int("model_streams", model_streams)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipseek-decode")
        self._load(self.defaults)

    def _load(self, options):
        return load_clip(options["pretrained_model_name_or_path"], options["device"], options["dtype"])

    @requests(on="/index")
    def encode(self, docs: DocList[ImageInput], parameters: Optional[Dict] = None, **kwargs) -> DocList[ImageInput]:
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        self._embed([d for d in traverse(docs, options["access_paths"]) if d.embedding is None and not len(getattr(d, "moments", ()))],
                    options, videos=True)
        return docs

    @requests(on="/search")
    def encode_queries(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None,
                       **kwargs) -> DocList[TextQuery]:
        """Query by example: the image of a query without text, and the image parts of any query."""
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        targets = []
        for doc in docs:
            for item in [doc, *doc.parts]:
                if item.embedding is None and has_image(item) and not (item.text or "").strip():
                    targets.append(item)
        if targets:
            self._embed(targets, {**options, "keep_pixels": False})
        return docs

    @requests(on="/classify")
    def classify(self, docs: DocList[TextQuery], parameters: Optional[Dict] = None, **kwargs) -> DocList[TextQuery]:
        """Zero-shot labels: the query image against its label parts (embedded by the text encoder), as
        the model's own probabilities, best first in ``matches``: for CLIP a softmax over the model's logit
        scale (they sum to 1), for SigLIP an independent sigmoid(logit scale x cosine + logit bias) per
        label (each says how well that one label fits; they need not sum to 1)."""
        options = request_options(self.defaults, parameters, REQUEST_OPTIONS)
        targets = [d for d in docs if not d.error and d.embedding is None and has_image(d)]
        self._embed(targets, {**options, "keep_pixels": False})
        clip = self._load(options)
        for doc in docs:
            labels = [p for p in doc.parts if p.embedding is not None]
            if doc.error:
                continue
            if doc.embedding is None:
                doc.error = "classify needs an image (url, bytes_ or tensor)"
            elif not labels:
                doc.error = "classify needs at least one label"
            else:
                cosines = np.stack([np.asarray(p.embedding) for p in labels]) @ np.asarray(doc.embedding)
                probs = clip.label_probabilities(cosines)
                order = np.argsort(-probs, kind="stable")
                doc.matches = DocList[Hit]([Hit(id=labels[i].text, score=float(probs[i]), tags={"label": labels[i].text})
                                            for i in order])
            doc.embedding = None
            for part in doc.parts:
                part.embedding = None
        return docs

    def _embed(self, targets, options, videos: bool = False) -> None:
        """Embed ``targets`` in batches, decoding ahead of the model; a document that fails gets its error.
        With ``videos`` a video file's document gets its ``moments``, each embedded like a picture."""
        batch_size = check_positive_int("batch_size", options["batch_size"])
        clip = self._load(options)
        recipe = Preprocess.from_processor_config(clip.processor_config)

        video = VideoOptions(spacing=float(options["video_spacing"]), max_moments=int(options["max_moments"]),
                             max_bytes=self.max_video_bytes) if videos else None

        def work(doc):
            spent: Dict[str, float] = {}
            # request parameters arrive through protobuf, where every number is a float
            result = prepare(doc, recipe, url_timeout=float(options["url_timeout"]),
                             max_bytes=int(options["max_download_bytes"]), draft=as_flag(options["draft_decode"], "draft_decode"),
                             max_megapixels=float(options["max_megapixels"]) if options["max_megapixels"] else None,
                             timings=spent,
                             allow_private_urls=self.allow_private_urls, allowed_roots=self.allowed_roots, video=video)
            return result, spent

        timings = {"prepare_wait": 0.0, "model": 0.0, "read": 0.0, "decode": 0.0, "preprocess": 0.0}
        results = prefetch(self._pool, work, targets, window=2 * batch_size)
        # On a CPU each batch is split to run on several model threads side by side (image_streams), and the next
        # batch is gathered meanwhile; a single picture (a query's) takes every thread.
        streams = image_streams(clip, self.model_streams)
        ahead = batches_ahead(streams)
        in_model: deque = deque()
        failed = 0

        def finish() -> None:
            ready, parts = in_model.popleft()
            t0 = time.perf_counter()
            vectors = np.concatenate([f.result() for f in parts])
            timings["model"] += time.perf_counter() - t0
            at = 0
            for doc, times in ready:
                if times is None:
                    doc.embedding = vectors[at]
                    at += 1
                else:
                    doc.moments = DocList[VideoMoment]([VideoMoment(t=t, embedding=vectors[at + i])
                                                        for i, t in enumerate(times)])
                    at += len(times)
                doc.embedding_model = clip.name
                doc.error = None
                if not options["keep_pixels"]:
                    doc.tensor, doc.bytes_ = None, None

        for batch in batched(targets, batch_size):
            ready, arrays = [], []
            t0 = time.perf_counter()
            for doc in batch:
                result = next(results)
                if isinstance(result, Exception):
                    failed += 1
                    if hasattr(doc, "status"):
                        doc.status = STATUS_FAILED
                    doc.error = _describe(result)
                    logger.warning("skipped %s", doc.error)
                    continue
                (pixels, width, height, info, times), spent = result
                for stage, seconds in spent.items():
                    timings[stage] += seconds
                if isinstance(doc, ImageInput):
                    doc.width, doc.height = width, height
                    if info is not None:
                        doc.uri = doc.uri or _source_name(info.uri)
                        doc.content_hash = info.content_hash
                        doc.size = info.size
                        doc.mtime = doc.mtime if info.mtime is None else info.mtime
                        _set_when_and_where(doc, getattr(info, "facts", None))
                ready.append((doc, times))
                arrays.extend(pixels if times is not None else [pixels])
            timings["prepare_wait"] += time.perf_counter() - t0
            if ready:  # a video's moments may make more than one batch
                in_model.append((ready, [submit_image_embeddings(clip, np.stack(arrays[i : i + batch_size]), streams)
                                         for i in range(0, len(arrays), batch_size)]))
            arrays = []
            while len(in_model) >= ahead:
                finish()
        while in_model:
            finish()
        logger.info("encoded %d images (%d failed): waited %.3f s for pixels, %.3f s in the model; "
                    "decode threads spent %.3f s reading, %.3f s decoding, %.3f s preprocessing",
                    len(targets) - failed, failed, timings["prepare_wait"], timings["model"],
                    timings["read"], timings["decode"], timings["preprocess"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def _roots(roots) -> Optional[List[str]]:
    """``allowed_roots`` as real absolute folder paths (a string may hold several, os.pathsep-separated)."""
    if roots is None:
        return None
    if isinstance(roots, str):
        roots = [r for r in roots.split(os.pathsep) if r]
    return [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in roots]


def _set_when_and_where(doc: ImageInput, facts) -> None:
    """The EXIF date, camera and place of a picture on its document; without an EXIF date, its file's mtime
    stands in (``taken_from`` says which). What the client sent itself is kept."""
    if facts is not None:
        if doc.taken is None and facts.taken is not None:
            doc.taken, doc.taken_from = facts.taken, facts.taken_from
        doc.camera = doc.camera or facts.camera
        if doc.latitude is None and facts.latitude is not None:
            doc.latitude, doc.longitude = facts.latitude, facts.longitude
    if doc.taken is None and doc.mtime is not None:
        doc.taken, doc.taken_from = doc.mtime, "mtime"


def _source_name(uri: str) -> str:
    """The name a picture read from ``uri`` is stored under: a local file by its real path (so one file
    reached by two paths is one entry), anything else as given."""
    path = local_path(uri)
    return path_uri(os.path.realpath(path)) if path is not None else uri


def _describe(error: Exception) -> str:
    if isinstance(error, ImageError):
        return str(error)
    return f"{type(error).__name__}: {error}"
