"""Loading an image-text dual encoder once per (name, device, dtype), and the helpers both encoders share.

The real loading path for every model is transformers' own: ``AutoConfig`` / ``AutoModel`` /
``AutoTokenizer`` / ``AutoImageProcessor`` ``.from_pretrained(name_or_folder)``, for the families in
``FAMILIES``: CLIP (``CLIPModel``, any size) and SigLIP (``SiglipModel``: SigLIP and the fixed-resolution
SigLIP 2 checkpoints, whose model type is ``siglip``). Any other model type is refused before its weights
are read. A hub name that cannot be reached becomes a ``ModelLoadError`` that names the model and says
how to point at a local folder instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, TypeVar

from executors.models import precision

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
MODEL_ENV = "CLIPSEEK_MODEL"
DEVICE_ENV = "CLIPSEEK_DEVICE"
DTYPE_ENV = "CLIPSEEK_DTYPE"
# torch threads on cpu (default: torch's own choice). On small VMs whose vCPUs share a core, 1 can be faster
# than 2 and leaves the other vCPU to JPEG decoding (benchmarks/index_throughput.py measures both).
THREADS_ENV = "CLIPSEEK_TORCH_THREADS"

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which one and what to do."""


@dataclass(frozen=True)
class Family:
    """What differs between the dual-encoder families clipseek runs.

    ``text_padding``: ``longest`` needs no padding (CLIP's text tower pools the end-of-text token wherever
    it is, so texts run in groups of one token length); ``max_length`` pads every text to the text tower's
    ``max_position_embeddings`` (SigLIP pools the last position and was trained on texts padded that way).
    ``scoring``: how /classify turns cosines into probabilities, as the model was trained: ``softmax``
    over ``logit_scale * cosine`` across the labels (CLIP's contrastive loss), or an independent
    ``sigmoid(logit_scale * cosine + logit_bias)`` per label (SigLIP's sigmoid loss).
    """

    name: str
    model_class: str
    text_padding: str
    scoring: str


FAMILIES = {
    "clip": Family("clip", "CLIPModel", text_padding="longest", scoring="softmax"),
    "siglip": Family("siglip", "SiglipModel", text_padding="max_length", scoring="sigmoid"),
}


def supported_families() -> str:
    return ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())


def model_family(model_type: Optional[str], name_or_path: str) -> Family:
    """The family of a config's ``model_type``, or a ``ModelLoadError`` that names the model, its type and
    the supported families."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = f"clipseek runs these families: {supported_families()}"
    if model_type == "siglip2":
        raise ModelLoadError(
            f"model {name_or_path!r} has model type 'siglip2' (SigLIP 2 NaFlex), which takes patch sequences with "
            f"their spatial shapes instead of fixed-size images; {supported}. Use a fixed-resolution SigLIP 2 "
            f"checkpoint instead, such as google/siglip2-base-patch16-224 (model type 'siglip').")
    if not _has_dual_encoder_methods(model_type):
        raise ModelLoadError(
            f"model {name_or_path!r} has model type {model_type!r}, whose model has no get_image_features / "
            f"get_text_features: it is not an image-text dual encoder; {supported}.")
    raise ModelLoadError(f"model {name_or_path!r} has model type {model_type!r}, which is not a supported family; "
                         f"{supported}.")


def _has_dual_encoder_methods(model_type: Optional[str]) -> bool:
    """Whether transformers' ``AutoModel`` class for ``model_type`` embeds both images and texts."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        names = MODEL_MAPPING_NAMES.get(model_type or "")
        for class_name in ([names] if isinstance(names, str) else list(names or ())):
            cls = getattr(transformers, class_name, None)
            if cls is not None and hasattr(cls, "get_image_features") and hasattr(cls, "get_text_features"):
                return True
    except Exception:  # noqa: BLE001 - a model type transformers cannot describe counts as lacking them
        return False
    return False


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def model_id(name_or_path: str) -> str:
    """The name stored beside embeddings: a hub name as given, a local folder by its folder name."""
    if os.path.isdir(name_or_path):
        return os.path.basename(os.path.normpath(name_or_path))
    return name_or_path


def resolve_device(device: Optional[str]) -> str:
    """``None`` / ``"auto"`` mean cuda when available, else cpu."""
    device = device or os.environ.get(DEVICE_ENV) or None
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be at least 1, got {number}")
    return number


@dataclass
class LoadedClip:
    """A loaded dual encoder (CLIP or SigLIP: ``family``) and what its encoders and /classify need."""

    name: str
    model: Any
    device: str
    dtype: Any  # the dtype of the model's input tensors (float32 for an int8 model)
    processor_config: dict
    tokenizer: Any = None
    precision: str = "float32"  # float32, bfloat16, int8 or float16 (executors/models/precision.py)
    logit_scale: float = 1.0  # exp of the model's learned temperature, read in float32 before any precision
    family: str = "clip"  # a key of FAMILIES
    logit_bias: float = 0.0  # SigLIP's learned bias (0 for CLIP), read in float32 before any precision
    text_padding: str = "longest"  # "longest" (CLIP) or "max_length" (SigLIP): see Family
    text_tower: Any = None  # the text tower on ONNX Runtime (executors/models/onnx_text.py), or None: torch

    def label_probabilities(self, cosines) -> Any:
        """Cosines of one image to its labels -> the probabilities the model's own ``logits_per_image``
        gives: a softmax across the labels (CLIP, they sum to 1), or an independent sigmoid per label
        (SigLIP: each says how well that label fits, they need not sum to 1)."""
        import numpy as np

        logits = np.asarray(cosines, dtype=np.float64) * self.logit_scale + self.logit_bias
        if FAMILIES[self.family].scoring == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        probs = np.exp(logits - logits.max())
        return probs / probs.sum()


_cache: "OrderedDict[tuple, LoadedClip]" = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 2


def load_clip(name_or_path: str, device: Optional[str] = None, dtype: Optional[str] = None,
              with_tokenizer: bool = False) -> LoadedClip:
    """Load (or reuse) a dual encoder of a supported family (``FAMILIES``) in eval mode on the resolved
    device, in the precision ``dtype`` names (``auto``, the default, picks this machine's fastest for the
    tower that will run: the text tower when loaded ``with_tokenizer``, else the image tower;
    executors/models/precision.py)."""
    dev = resolve_device(device)
    chosen = _text_runtime(dtype or os.environ.get(DTYPE_ENV), dev) if with_tokenizer else None
    chosen = chosen or precision.choose(dtype or os.environ.get(DTYPE_ENV), dev, tower="text" if with_tokenizer else "image")
    key = (name_or_path, dev, chosen.name, chosen.runtime, with_tokenizer)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        loaded = _load(name_or_path, dev, chosen, with_tokenizer)
        _cache[key] = loaded
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return loaded


def _text_runtime(dtype: Optional[str], device: str) -> Optional["precision.Precision"]:
    """ONNX Runtime for the text tower on a cpu when ``auto`` (the default) leaves it free to choose and it is
    installed, or when CLIPSEEK_TEXT_RUNTIME=onnxruntime asks for it; None: torch decides (precision.choose)."""
    from executors.models import onnx_text
    from executors.params import dtype_name

    wanted = onnx_text.runtime_wanted()
    name = dtype_name(dtype or precision.DEFAULT_PRECISION, precision.PRECISIONS)
    if wanted == "torch" or not device.startswith("cpu"):
        return None
    version = onnx_text.available()
    if wanted == "onnxruntime":
        if version is None:
            raise ValueError(f"{onnx_text.RUNTIME_ENV}=onnxruntime, but onnxruntime (and onnx) do not import here")
        if name not in ("auto", "float32", "int8"):
            raise ValueError(f"the text tower on ONNX Runtime runs in float32 or int8; dtype {name} runs on torch "
                             f"({onnx_text.RUNTIME_ENV}=torch)")
        if name != "auto":
            return precision.Precision(name, f"asked for, on ONNX Runtime {version}", runtime="onnxruntime")
    elif name != "auto" or version is None:
        return None
    # "auto": the export in float32, or its int8 copy where that measures faster and keeps the embeddings
    return precision.Precision("auto", f"auto on cpu for the text tower: ONNX Runtime {version}", runtime="onnxruntime")


def _load(name_or_path: str, device: str, chosen: "precision.Precision", with_tokenizer: bool) -> LoadedClip:
    import torch
    from transformers import AutoConfig, AutoModel

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(name_or_path)
            family = model_family(getattr(config, "model_type", None), name_or_path)  # before reading any weights
            model = AutoModel.from_pretrained(name_or_path, config=config, dtype=torch.float32)
            tokenizer = None
            if with_tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            processor_config = image_processor_config(name_or_path)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(model_error_message(name_or_path, e)) from None
    logit_scale = float(model.logit_scale.detach().float().exp())
    bias = getattr(model, "logit_bias", None)
    logit_bias = float(bias.detach().float().reshape(-1)[0]) if bias is not None else 0.0
    model = model.eval().requires_grad_(False).to(device)
    if chosen.runtime == "torch":  # on ONNX Runtime the torch model stays float32: the export's source and reference
        model = precision.apply(model, chosen)
    threads = os.environ.get(THREADS_ENV)
    if threads and device == "cpu":  # torch's intra-op threads for this whole process
        torch.set_num_threads(check_positive_int(THREADS_ENV, threads))
    process_threads()  # read now, before any model thread sets a number of its own
    text_tower = None
    if chosen.runtime == "onnxruntime":
        text_tower, chosen = _onnx_text_tower(model, name_or_path, tokenizer, family, chosen)
    logger.info("loaded %s model %s on %s in %s (%s)", family.name, name_or_path, device, chosen.name, chosen.reason)
    return LoadedClip(model_id(name_or_path), model, device, chosen.input_dtype, processor_config, tokenizer, chosen.name,
                      logit_scale, family=family.name, logit_bias=logit_bias, text_padding=family.text_padding,
                      text_tower=text_tower)


def _onnx_text_tower(model, name_or_path: str, tokenizer, family: "Family", chosen: "precision.Precision"):
    """(ONNX Runtime text tower, precision) for ``model``; (None, torch float32) with the reason if it cannot be
    made, unless ONNX Runtime was asked for by name (then ModelLoadError)."""
    import torch

    import numpy as np

    from executors.models import onnx_text

    padding = {"padding": "max_length", "max_length": model.config.text_config.max_position_embeddings} \
        if family.text_padding == "max_length" else {}
    def tokens(text: str) -> dict:
        sample = tokenizer([text], truncation=True, return_tensors="np", **padding)
        sample = {k: v for k, v in sample.items() if k in TEXT_INPUTS}
        if family.text_padding != "max_length":
            sample["attention_mask"] = np.ones_like(sample["input_ids"])  # as _text_embeddings_by_length sends it
        return sample

    try:
        f32 = onnx_text.load_or_export(model, name_or_path, tokens(onnx_text.SAMPLE_TEXT), torch.get_num_threads())
    except (RuntimeError, OSError, ImportError) as e:
        if onnx_text.runtime_wanted() == "onnxruntime":
            raise ModelLoadError(f"cannot run the text tower of {name_or_path!r} on ONNX Runtime: {e}") from None
        logger.warning("text tower of %s stays on torch: %s", name_or_path, e)
        return None, precision.Precision("float32", f"auto on cpu for the text tower: torch float32 (ONNX Runtime "
                                                    f"could not be used: {e})")
    if chosen.name == "float32":
        return f32, chosen
    samples = [tokens(text) for text in onnx_text.SAMPLE_TEXTS]
    try:
        int8, cosine = onnx_text.int8_tower(f32, model, samples)
    except (RuntimeError, OSError, ImportError) as e:
        if chosen.name == "int8":
            raise ModelLoadError(f"cannot run the text tower of {name_or_path!r} in int8 on ONNX Runtime: {e}") from None
        logger.warning("text tower of %s stays in float32: %s", name_or_path, e)
        return f32, precision.Precision("float32", f"{chosen.reason}, float32 (int8 could not be made: {e})",
                                        runtime="onnxruntime")
    close = f"cosine {cosine:.5f} to torch float32 at worst over {len(samples)} sample texts"
    if chosen.name == "int8":
        return int8, precision.Precision("int8", f"{chosen.reason} ({close})", runtime="onnxruntime")
    if cosine < onnx_text.INT8_MIN_COSINE:
        return f32, precision.Precision("float32", f"{chosen.reason}, float32: int8 keeps only {close}, under "
                                                   f"{onnx_text.INT8_MIN_COSINE}", runtime="onnxruntime")
    gain = onnx_text.int8_speedup(f32, int8, samples[0])
    measured = f"measured {gain:.2f}x its float32 export on one query, {close}"
    if gain >= precision.MIN_SPEEDUP:
        return int8, precision.Precision("int8", f"{chosen.reason}, int8 ({measured})", runtime="onnxruntime")
    return f32, precision.Precision("float32", f"{chosen.reason}, float32 (int8 {measured}: under "
                                               f"{precision.MIN_SPEEDUP}x)", runtime="onnxruntime")


def model_error_message(name_or_path: str, error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, ImportError):  # a package the tokenizer or processor needs, not the network
        first_sentence = " ".join(str(error).split()).split(". ")[0] or type(error).__name__
        return f"cannot load model {name_or_path!r}: {first_sentence}"
    if os.path.isdir(name_or_path):
        return f"cannot load model from folder {name_or_path!r}: {first_line}"
    if looks_like_path(name_or_path):
        return (f"cannot load model {name_or_path!r}: no such folder. Give a folder saved by save_pretrained "
                f"(config.json, the weights, the tokenizer and the image processor), or a hub name such as {DEFAULT_MODEL}")
    return (
        f"cannot load model {name_or_path!r}: {first_line}\n"
        f"If this machine is offline, download the model where there is network access "
        f"(`hf download {name_or_path} --local-dir DIR`, or `AutoModel.from_pretrained(...).save_pretrained(DIR)` "
        f"together with the tokenizer and processor) and point clipseek at the folder: "
        f"--model DIR or {MODEL_ENV}=DIR. The shipped demo model is data/models/clipseek-demo."
    )


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder, not a hub name (``org/name``): it starts with ``/``, ``.``, ``~``
    or a drive, ends with a separator, or has more than one separator."""
    return (name.startswith(("/", ".", "~", "\\")) or name.endswith(("/", os.sep)) or (len(name) > 1 and name[1] == ":")
            or name.replace(os.sep, "/").count("/") > 1)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def image_processor_config(name_or_path: str) -> dict:
    """The image processor's settings of a folder or hub model, read by transformers' own loading
    (``AutoImageProcessor``), so every folder transformers loads (``preprocessor_config.json``, or the
    ``processor_config.json`` that ``CLIPProcessor.save_pretrained`` writes) loads here too."""
    from transformers import AutoImageProcessor

    try:
        with quiet_transformers():
            processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        if os.path.isdir(name_or_path) and not any(os.path.exists(os.path.join(name_or_path, f)) for f in PROCESSOR_FILES):
            raise OSError(f"{name_or_path} has no image processor settings: neither {PROCESSOR_FILES[0]} nor "
                          f"{PROCESSOR_FILES[1]} (save the model's image processor or processor beside it)") from None
        raise
    return processor.to_dict()


@contextlib.contextmanager
def quiet_transformers():
    """transformers' advice and progress bars (its torchvision fallback notice, "Loading weights") go to
    the log at debug level only: the console stays for what a person asked for."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    if not logger.isEnabledFor(logging.DEBUG):
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_model_available(name_or_path: str) -> None:
    """Cheap check that a model can be loaded, without loading it (raises ModelLoadError)."""
    if not os.path.isdir(name_or_path) and looks_like_path(name_or_path):
        raise ModelLoadError(model_error_message(name_or_path, FileNotFoundError(name_or_path)))
    if os.path.isdir(name_or_path):
        missing = [] if os.path.exists(os.path.join(name_or_path, "config.json")) else ["config.json"]
        if not any(os.path.exists(os.path.join(name_or_path, f)) for f in PROCESSOR_FILES):
            missing.append(f"{PROCESSOR_FILES[0]} or {PROCESSOR_FILES[1]}")
        if missing:
            raise ModelLoadError(f"folder {name_or_path!r} is not a saved model: missing {', '.join(missing)}")
        _check_saved_family(name_or_path, name_or_path)
        return
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except Exception as e:  # any hub or network failure becomes one clear message
        raise ModelLoadError(model_error_message(name_or_path, e)) from None
    _check_saved_family(folder, name_or_path)


def _check_saved_family(folder: str, name_or_path: str) -> None:
    """Refuse a model whose ``config.json`` names a model type outside ``FAMILIES`` (ModelLoadError)."""
    import json

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config is reported by the loading itself, with transformers' own words
    model_family(model_type, name_or_path)


def features(output) -> Any:
    """transformers 5 returns a model output with ``pooler_output``; 4.x returned the tensor."""
    return output if hasattr(output, "norm") else output.pooler_output


def _to_unit_numpy(features) -> "Any":
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype("float32", copy=False)


MODEL_THREAD = "clipseek-model"
_model_thread_lock = threading.Lock()
_model_thread: Any = None


def _reset_model_thread() -> None:
    global _model_thread, _default_threads
    _model_thread = None  # a forked child has the pool objects but not their threads
    _stream_pools.clear()
    _default_threads = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_model_thread)


def on_model_thread(fn, *args, **kwargs):
    """Run ``fn`` on the one thread of this process that runs the models, and wait for it.

    A server calls the encoders from whichever thread of its pool takes the request, and torch
    (OpenMP) keeps a team of worker threads per calling thread: the ViT-B/32 text tower took
    36 ms per query called from a pool of threads with pauses between calls, 23-28 ms called
    from one thread (2 vCPUs). Calls made on that thread already run directly.
    """
    if threading.current_thread().name.startswith(MODEL_THREAD):
        return fn(*args, **kwargs)
    return _model_pool().submit(fn, *args, **kwargs).result()


async def on_model_thread_async(fn, *args, **kwargs):
    """``on_model_thread`` for a coroutine: ``fn`` runs on the model thread while the event loop goes on.

    A sync jina endpoint runs on a thread of jina's pool, which then hands the model's part to the model
    thread and waits: two thread switches per request. An async endpoint that hands its whole work here
    makes one (the search flow's two executors: 0.45 ms less per query, measured with no-op executors).
    """
    import asyncio
    import functools

    if threading.current_thread().name.startswith(MODEL_THREAD):
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_model_pool(), functools.partial(fn, *args, **kwargs))


def _model_pool():
    """The one-thread pool that runs the models, made at the first call."""
    global _model_thread
    with _model_thread_lock:
        if _model_thread is None:
            from concurrent.futures import ThreadPoolExecutor

            _model_thread = ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        return _model_thread


def image_embeddings(clip: LoadedClip, pixel_values) -> "Any":
    """(B, 3, H, W) float32 array -> (B, D) float32 L2-normalized embeddings."""
    return on_model_thread(_image_embeddings, clip, pixel_values)


_stream_pools: Dict[int, Any] = {}


MAX_STREAMS = 8


def image_streams(clip: LoadedClip, wanted: Optional[int] = None) -> int:
    """Into how many parts a batch of images is split to run side by side: on a CPU one per torch thread of this
    process (at most ``wanted``, which None leaves at MAX_STREAMS), each part on a thread of its own with an
    equal share of the threads; 1 on a GPU, or where the process has one thread."""
    if clip.device != "cpu":
        return 1
    return max(1, min(process_threads(), wanted or MAX_STREAMS))


class _Parts:
    """The Futures of a batch's parts, read back as one Future of the whole batch's embeddings."""

    def __init__(self, futures):
        self.futures = futures

    def result(self):
        import numpy as np

        return np.concatenate([f.result() for f in self.futures])


def submit_image_embeddings(clip: LoadedClip, pixel_values, streams: int = 1) -> "Any":
    """``image_embeddings`` to be read with ``.result()``. With ``streams`` > 1 (``image_streams``) the batch is
    split into that many parts (at most one per image), each run on a model thread of its own with this
    process's torch threads divided among them, instead of the whole batch on every thread: on 2 vCPUs the two
    halves of a ViT-B/32 batch on one thread each embedded about as many images per second as the whole batch
    on both threads in float32, a fifth more in bfloat16 and half more in int8 (benchmarks/index_throughput.py,
    column (a)): the steps of one call that do not spread over the threads leave a core idle, which the other
    part fills. A picture's embedding does
    not depend on its batch neighbours, so the parts give the same embeddings as the whole."""
    parts = min(streams, len(pixel_values))
    if parts <= 1 and threading.current_thread().name.startswith(MODEL_THREAD):
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(_image_embeddings(clip, pixel_values))  # waiting on its own pool would never end
        return done
    if parts <= 1:
        return _model_pool().submit(_image_embeddings, clip, pixel_values)
    with _model_thread_lock:
        pool = _stream_pools.get(streams)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = _stream_pools[streams] = ThreadPoolExecutor(streams, thread_name_prefix=f"{MODEL_THREAD}-stream")
    import numpy as np

    threads = max(1, process_threads() // parts)
    return _Parts([pool.submit(_image_embeddings, clip, part, threads) for part in np.array_split(pixel_values, parts)])


def batches_ahead(streams: int) -> int:
    """How many batches are in the model at once: with parts side by side the next batch is handed over
    before the last one's result is awaited (its parts queue behind), else one batch at a time."""
    return 2 if streams > 1 else 1


def embed_in_order(clip: LoadedClip, batches, streams: int = 1) -> Iterator:
    """The embeddings of each of ``batches`` (pixel arrays) in order, handed to the model as the image encoder
    hands them (``submit_image_embeddings``, ``batches_ahead``)."""
    from collections import deque

    running: deque = deque()
    for pixels in batches:
        running.append(submit_image_embeddings(clip, pixels, streams))
        if len(running) >= batches_ahead(streams):
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


def _image_embeddings(clip: LoadedClip, pixel_values, threads: Optional[int] = None) -> "Any":
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(pixel_values)
        if clip.device.startswith("cuda"):
            tensor = tensor.pin_memory().to(clip.device, non_blocking=True)
        tensor = tensor.to(clip.dtype)
        if clip.device == "cpu":
            _use_threads(threads)  # every thread (or a stream's share) for a batch, whatever a text call used before
        return _to_unit_numpy(features(clip.model.get_image_features(pixel_values=tensor)))


# What get_text_features takes from a tokenizer's output (a tokenizer may add others, e.g. token_type_ids).
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def text_embeddings(clip: LoadedClip, texts: Sequence[str], max_length: int = 77) -> "Any":
    """Texts -> (B, D) float32 L2-normalized embeddings; tokens cut at ``max_length`` (and at the text
    tower's length), padded as the family was trained (``clip.text_padding``): not at all (CLIP: texts of
    one token length run together, so a text's embedding never depends on the others of its batch), or to
    the text tower's full ``max_position_embeddings`` (SigLIP)."""
    if clip.tokenizer is None:
        raise RuntimeError("text_embeddings needs a model loaded with with_tokenizer=True")
    model_length = getattr(clip.model.config.text_config, "max_position_embeddings", max_length)
    limit = min(max_length, model_length)
    if clip.text_padding == "max_length":
        if limit < model_length:  # cut shorter than the model's length, still padded to all of it
            cut = clip.tokenizer(list(texts), truncation=True, max_length=limit)
            tokens = clip.tokenizer.pad(cut, padding="max_length", max_length=model_length, return_tensors="pt")
        else:
            tokens = clip.tokenizer(list(texts), padding="max_length", truncation=True, max_length=model_length,
                                    return_tensors="pt")
    else:
        return _text_embeddings_by_length(clip, texts, limit)
    return on_model_thread(_text_features, clip, {k: v for k, v in tokens.items() if k in TEXT_INPUTS})


def _text_embeddings_by_length(clip: LoadedClip, texts: Sequence[str], limit: int) -> "Any":
    """CLIP-style texts, run in groups of one token length: no text is padded, so a text's embedding is the
    same alone or beside longer texts in any precision (an int8 Linear takes its activation scale from all
    of a text's positions, padding included)."""
    import numpy as np
    import torch

    ids = clip.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
    by_length: dict = {}
    for pos, row in enumerate(ids):
        by_length.setdefault(len(row), []).append(pos)
    out = None
    for positions in by_length.values():
        input_ids = torch.tensor([ids[p] for p in positions], dtype=torch.long)
        tokens = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        vectors = on_model_thread(_text_features, clip, tokens)
        if out is None:
            out = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)
        out[positions] = vectors
    return out


# A bfloat16 or int8 text call of at most this many tokens (batch x length) runs on one torch thread on a
# CPU: its matrices are so small that two threads spend more on meeting each other than on multiplying.
# One query of the ViT-B/32 text tower took 7.4 ms (bfloat16) and 3.7 ms (int8) on one thread, 13.8 and
# 10.4 ms on two (2 vCPUs), and the other CPU stays free for the flow's other processes. float32 gained
# nothing clear (16.4 against 12.7-18.6 ms on two threads) and keeps the process's threads.
SMALL_TEXT_TOKENS = 512


def _text_features(clip: LoadedClip, tokens) -> "Any":
    import torch

    if clip.text_tower is not None:  # ONNX Runtime (executors/models/onnx_text.py)
        return _to_unit_numpy(torch.from_numpy(clip.text_tower(tokens)))

    if clip.device == "cpu":
        small = clip.precision != "float32" and int(tokens["input_ids"].numel()) <= SMALL_TEXT_TOKENS
        _use_threads(1 if small else None)
    with torch.inference_mode():
        tokens = {k: v.to(clip.device) for k, v in tokens.items()}
        return _to_unit_numpy(features(clip.model.get_text_features(**tokens)))


_default_threads: Optional[int] = None


def process_threads() -> int:
    """torch's intra-op threads for this process (CLIPSEEK_TORCH_THREADS, else torch's default), read at the
    first model load or call: the model threads set their own number per call (``_use_threads``), and torch
    starts a new thread with the number set last by any thread."""
    import torch

    global _default_threads
    if _default_threads is None:
        _default_threads = torch.get_num_threads()
    return _default_threads


def _use_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads for the calls that follow on this model thread (torch keeps the number per
    thread): ``threads``, or None for the process's own number; changed only when it differs (a change costs
    more than a small call)."""
    import torch

    wanted = threads or process_threads()
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
