"""The precision a model runs in, and what ``auto`` picks for this machine.

- ``float32``: transformers' weights as they are (the reference).
- ``bfloat16``: weights and activations in bfloat16. On a CPU with native bfloat16 (AVX512-BF16 or
  AMX) matmuls run several times float32's speed.
- ``int8``: dynamic quantization of every ``Linear`` layer (``torch.ao.quantization.quantize_dynamic``:
  int8 weights, activations quantized per input item); CPU only. Fast where the CPU has VNNI. torch
  quantizes a whole activation tensor with one scale, so a picture's embedding would depend on the other
  pictures of its batch (a picture embedded alone as a query scored 0.99987 against itself indexed in a
  batch); each Linear here quantizes every batch item on its own (``PerItemDynamicLinear``), so an
  embedding is the same alone or in any batch.
- ``float16``: CUDA only.
- ``auto`` (the default): float16 on CUDA. On a CPU, for the image tower (batches of images) bfloat16
  where the CPU has native bfloat16; for the text tower (mostly one short query at a time, matrices so
  small that bfloat16 gains little) int8 where the CPU has VNNI. Otherwise int8 where a short probe at
  load measures it faster than float32, else float32.

Embeddings always leave the encoders as float32, L2-normalized, so vectors made in any precision of
one model share one index (benchmarks/index_throughput.py prints the cosines between them).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from executors.params import dtype_name

PRECISIONS = ("auto", "float32", "bfloat16", "int8", "float16")
DEFAULT_PRECISION = "auto"
# int8 is picked by ``auto`` (on a CPU without native bfloat16) only when the probe measures at least this gain.
INT8_MIN_SPEEDUP = 1.2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """A precision chosen for one device: ``name`` and why it was chosen."""

    name: str
    reason: str

    @property
    def input_dtype(self):
        """The dtype of the tensors the model takes (an int8 model takes float32 activations)."""
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.name, torch.float32)


def cpu_capabilities() -> Dict[str, bool]:
    """What this CPU runs natively, as torch's own dispatch sees it."""
    import torch

    def has(probe: str) -> bool:
        check = getattr(torch.cpu, probe, None)
        try:
            return bool(check()) if check is not None else False
        except Exception:  # noqa: BLE001 - an unknown CPU counts as lacking the feature
            return False

    return {"avx512_bf16": has("_is_avx512_bf16_supported"), "amx": has("_is_amx_tile_supported"),
            "vnni": has("_is_vnni_supported"), "avx2": has("_is_avx2_supported")}


def native_bfloat16() -> Optional[str]:
    """What runs bfloat16 matmuls natively on this CPU ("AMX" or "AVX512-BF16"), or None."""
    caps = cpu_capabilities()
    return "AMX" if caps["amx"] else "AVX512-BF16" if caps["avx512_bf16"] else None


_probe_lock = threading.Lock()
_int8_speedup: Optional[float] = None


def int8_speedup(width: int = 768, tokens: int = 64, repeat: int = 5) -> float:
    """float32 time / int8 time of one transformer-sized Linear on this CPU (measured once, ~0.1 s)."""
    global _int8_speedup
    with _probe_lock:
        if _int8_speedup is None:
            import torch

            layer = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)).eval()
            quantized = torch.ao.quantization.quantize_dynamic(layer, {torch.nn.Linear}, dtype=torch.qint8)
            x = torch.randn(tokens, width)
            times = []
            with torch.inference_mode():
                for model in (layer, quantized):
                    model(x)
                    t0 = time.perf_counter()
                    for _ in range(repeat):
                        model(x)
                    times.append(time.perf_counter() - t0)
            _int8_speedup = times[0] / max(times[1], 1e-9)
        return _int8_speedup


def choose(dtype: Optional[str], device: str, tower: str = "image") -> Precision:
    """The precision for ``dtype`` (any spelling; None = auto) on ``device`` for the ``tower`` ("image" or
    "text") that will mostly run, or ValueError naming why not."""
    name = dtype_name(dtype or DEFAULT_PRECISION, PRECISIONS)
    cuda = str(device).startswith("cuda")
    if name == "auto":
        if cuda:
            return Precision("float16", "auto on cuda: float16")
        caps = cpu_capabilities()
        if tower == "text" and caps["vnni"]:
            # one ViT-B/32 query: int8 4.6 ms, bfloat16 8.4 ms, float32 15.3 ms (benchmarks/search_latency.py)
            return Precision("int8", "auto on cpu for the text tower: the CPU has VNNI (int8 dot products); "
                                     "short queries run fastest in int8")
        native = native_bfloat16()
        if native:
            return Precision("bfloat16", f"auto on cpu: the CPU has native bfloat16 ({native})")
        gain = int8_speedup()
        if gain >= INT8_MIN_SPEEDUP:
            return Precision("int8", f"auto on cpu: no native bfloat16; int8 Linear measured {gain:.1f}x float32")
        return Precision("float32", f"auto on cpu: no native bfloat16, int8 measured only {gain:.1f}x float32")
    if name == "float16" and not cuda:
        raise ValueError(f"dtype float16 needs a cuda device; device is {device!r} (on cpu: auto, bfloat16, int8 or float32)")
    if name == "int8" and cuda:
        raise ValueError("dtype int8 (dynamic quantization) runs on the cpu only; on cuda use float16 or auto")
    return Precision(name, "asked for")


def apply(model: Any, precision: Precision) -> Any:
    """``model`` (float32, eval mode, on its device) in ``precision``; int8 returns a quantized copy whose
    Linear layers quantize each batch item apart (``per_item_int8``)."""
    if precision.name == "int8":
        return per_item_int8(model)
    return model.to(precision.input_dtype)


def per_item_int8(model: Any) -> Any:
    """A dynamically quantized copy of ``model`` in which every quantized Linear quantizes the activations
    of each batch item (dim 0: an image's or a text's tokens, or one row of a 2-D input such as the input of
    the final projection) with a scale of its own."""
    import torch

    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    dynamic_linear, per_item = torch.ao.nn.quantized.dynamic.Linear, per_item_linear_class()
    for parent in list(quantized.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, dynamic_linear):
                setattr(parent, name, per_item(child))
    return quantized


_per_item_linear: Any = None


def per_item_linear_class() -> Any:
    """The ``PerItemDynamicLinear`` module class (made on first use, so that importing this module needs no torch)."""
    global _per_item_linear
    if _per_item_linear is not None:
        return _per_item_linear
    import torch

    class PerItemDynamicLinear(torch.nn.Module):
        """A dynamically quantized Linear applied to each item of a batch on its own: the activation scale
        comes from that item's tokens only, never from its batch neighbours."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.dim() < 2 or x.shape[0] == 1:
                return self.inner(x)
            return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])

    _per_item_linear = PerItemDynamicLinear
    return _per_item_linear
