"""Loading a CLIP model once per (name, device, dtype), and the helpers both encoders share.

The real loading path for every model: ``CLIPModel.from_pretrained(name_or_folder)``.
A hub name that cannot be reached becomes a ``ModelLoadError`` that names the model and
says how to point at a local folder instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar

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
    name: str
    model: Any
    device: str
    dtype: Any  # the dtype of the model's input tensors (float32 for an int8 model)
    processor_config: dict
    tokenizer: Any = None
    precision: str = "float32"  # float32, bfloat16, int8 or float16 (executors/models/precision.py)
    logit_scale: float = 1.0  # exp of the model's learned temperature, read in float32 before any precision


_cache: "OrderedDict[tuple, LoadedClip]" = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 2


def load_clip(name_or_path: str, device: Optional[str] = None, dtype: Optional[str] = None,
              with_tokenizer: bool = False) -> LoadedClip:
    """Load (or reuse) a CLIPModel in eval mode on the resolved device, in the precision ``dtype``
    names (``auto``, the default, picks this machine's fastest: executors/models/precision.py)."""
    dev = resolve_device(device)
    chosen = precision.choose(dtype or os.environ.get(DTYPE_ENV), dev)
    key = (name_or_path, dev, chosen.name, with_tokenizer)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        loaded = _load(name_or_path, dev, chosen, with_tokenizer)
        _cache[key] = loaded
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return loaded


def _load(name_or_path: str, device: str, chosen: "precision.Precision", with_tokenizer: bool) -> LoadedClip:
    import torch
    from transformers import CLIPModel

    try:
        with quiet_transformers():
            model = CLIPModel.from_pretrained(name_or_path, dtype=torch.float32)
            tokenizer = None
            if with_tokenizer:
                from transformers import CLIPTokenizer

                tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
            processor_config = image_processor_config(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(model_error_message(name_or_path, e)) from None
    logit_scale = float(model.logit_scale.detach().float().exp())
    model = precision.apply(model.eval().requires_grad_(False).to(device), chosen)
    threads = os.environ.get(THREADS_ENV)
    if threads and device == "cpu":  # torch's intra-op threads for this whole process
        torch.set_num_threads(check_positive_int(THREADS_ENV, threads))
    logger.info("loaded CLIP %s on %s in %s (%s)", name_or_path, device, chosen.name, chosen.reason)
    return LoadedClip(model_id(name_or_path), model, device, chosen.input_dtype, processor_config, tokenizer, chosen.name,
                      logit_scale)


def model_error_message(name_or_path: str, error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(name_or_path):
        return f"cannot load CLIP model from folder {name_or_path!r}: {first_line}"
    return (
        f"cannot load CLIP model {name_or_path!r}: {first_line}\n"
        f"If this machine is offline, download the model where there is network access "
        f"(`huggingface-cli download {name_or_path}`, or `CLIPModel.from_pretrained(...).save_pretrained(DIR)` "
        f"together with the tokenizer and processor) and point clipseek at the folder: "
        f"--model DIR or {MODEL_ENV}=DIR. The shipped demo model is data/models/clipseek-demo."
    )


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
    if os.path.isdir(name_or_path):
        missing = [] if os.path.exists(os.path.join(name_or_path, "config.json")) else ["config.json"]
        if not any(os.path.exists(os.path.join(name_or_path, f)) for f in PROCESSOR_FILES):
            missing.append(f"{PROCESSOR_FILES[0]} or {PROCESSOR_FILES[1]}")
        if missing:
            raise ModelLoadError(f"folder {name_or_path!r} is not a saved CLIP model: missing {', '.join(missing)}")
        return
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except Exception as e:  # any hub or network failure becomes one clear message
        raise ModelLoadError(model_error_message(name_or_path, e)) from None


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
    global _model_thread
    _model_thread = None  # a forked child has the pool object but not its thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_model_thread)


def on_model_thread(fn, *args, **kwargs):
    """Run ``fn`` on the one thread of this process that runs the models, and wait for it.

    A server calls the encoders from whichever thread of its pool takes the request, and torch
    (OpenMP) keeps a team of worker threads per calling thread: the ViT-B/32 text tower took
    36 ms per query called from a pool of threads with pauses between calls, 23-28 ms called
    from one thread (2 vCPUs). Calls made on that thread already run directly.
    """
    global _model_thread
    if threading.current_thread().name.startswith(MODEL_THREAD):
        return fn(*args, **kwargs)
    with _model_thread_lock:
        if _model_thread is None:
            from concurrent.futures import ThreadPoolExecutor

            _model_thread = ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        pool = _model_thread
    return pool.submit(fn, *args, **kwargs).result()


def image_embeddings(clip: LoadedClip, pixel_values) -> "Any":
    """(B, 3, H, W) float32 array -> (B, D) float32 L2-normalized embeddings."""
    return on_model_thread(_image_embeddings, clip, pixel_values)


def _image_embeddings(clip: LoadedClip, pixel_values) -> "Any":
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(pixel_values)
        if clip.device.startswith("cuda"):
            tensor = tensor.pin_memory().to(clip.device, non_blocking=True)
        tensor = tensor.to(clip.dtype)
        return _to_unit_numpy(features(clip.model.get_image_features(pixel_values=tensor)))


def text_embeddings(clip: LoadedClip, texts: Sequence[str], max_length: int = 77) -> "Any":
    """Texts -> (B, D) float32 L2-normalized embeddings; tokens padded to the longest text, cut at max_length."""
    if clip.tokenizer is None:
        raise RuntimeError("text_embeddings needs a model loaded with with_tokenizer=True")
    limit = min(max_length, getattr(clip.model.config.text_config, "max_position_embeddings", max_length))
    tokens = clip.tokenizer(list(texts), padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    return on_model_thread(_text_features, clip, tokens)


def _text_features(clip: LoadedClip, tokens) -> "Any":
    import torch

    with torch.inference_mode():
        tokens = {k: v.to(clip.device) for k, v in tokens.items()}
        return _to_unit_numpy(features(clip.model.get_text_features(**tokens)))
