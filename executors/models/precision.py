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
- ``auto`` (the default): float16 on CUDA. On a CPU it measures, once per process, one transformer MLP
  layer pair of the tower's width and usual work (a batch of images; one short query) in float32 and in each
  candidate, in order of preference: bfloat16 where the CPU runs it natively (never where it is only
  emulated, 8x slower), then for images int8 (torch's int8 text tower keeps only cosine 0.998; the text tower's
  int8 runs on ONNX Runtime instead: executors/models/onnx_text.py); it picks the
  first that beats float32 by MIN_SPEEDUP, else float32. The choice, the figures and
  the CPU's bfloat16 support are logged at load. The figures are measured once per machine and recorded
  (``probe_file()``: ``~/.cache/clipseek/precision.json``, keyed by the probe, torch, the CPU and the
  threads), so every later start, and every process started beside it, makes the same choice; delete the
  file (or set ``CLIPSEEK_PRECISION_CACHE`` to another path, or to "" to measure in every process) to
  measure again.

Embeddings always leave the encoders as float32, L2-normalized, so vectors made in any precision of
one model share one index (benchmarks/index_throughput.py prints the cosines between them).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

from executors.params import dtype_name

PRECISIONS = ("auto", "float32", "bfloat16", "int8", "float16")
DEFAULT_PRECISION = "auto"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """A precision chosen for one device: ``name`` and why it was chosen."""

    name: str
    reason: str
    runtime: str = "torch"  # or "onnxruntime" (the text tower on a cpu: executors/models/onnx_text.py)

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


def avx2_only() -> bool:
    """Whether this CPU is of the AVX2-only kind: torch's kernels AVX2, with neither VNNI, AVX512-BF16 nor AMX
    (emulated bfloat16, int8 dot products without VNNI). ``tests/avx2.sh`` emulates one."""
    import torch

    caps = cpu_capabilities()
    return (torch.backends.cpu.get_cpu_capability() == "AVX2" and caps["avx2"]
            and not (caps["vnni"] or caps["avx512_bf16"] or caps["amx"]))


def native_bfloat16() -> Optional[str]:
    """What runs bfloat16 matmuls natively on this CPU ("AMX" or "AVX512-BF16"), or None."""
    caps = cpu_capabilities()
    return "AMX" if caps["amx"] else "AVX512-BF16" if caps["avx512_bf16"] else None


_probe_lock = threading.Lock()
_speedups: Dict[tuple, Dict[str, float]] = {}

# The work each tower mostly does, as two Linear layers of its width: a batch of images (4 x 50 tokens of
# ViT-B/32, width 768) or one short query (16 tokens, width 512). Small enough to measure in ~0.2 s.
PROBES = {"image": (768, 4, 50), "text": (512, 1, 16)}  # width, batch, tokens
# What ``auto`` may pick per tower on a CPU, in order of preference: int8 only for images (the dynamic
# int8 text tower of ViT-B/32 keeps only cosine 0.9982 to float32, under the 0.999 every auto choice keeps),
# bfloat16 only where the CPU runs it natively (emulated, it measured 8x slower than float32 on AVX2).
AUTO_CANDIDATES = {"image": ("bfloat16", "int8"), "text": ("bfloat16",)}
# A precision other than float32 is picked only when the probe measures at least this gain.
MIN_SPEEDUP = 1.2


PROBE_FILE_ENV = "CLIPSEEK_PRECISION_CACHE"


def probe_file() -> Optional[str]:
    """Where the probe's figures are recorded for this machine (None: not recorded, measured per process)."""
    path = os.environ.get(PROBE_FILE_ENV)
    if path is not None:
        return os.path.abspath(os.path.expanduser(path)) if path else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipseek", "precision.json")


def speedups(tower: str = "image", repeat: int = 7) -> Dict[str, float]:
    """float32 time / time in each candidate precision of ``tower``'s probe on this CPU (~0.1-0.5 s to measure):
    what ``auto`` decides by. Measured once per machine and recorded in ``probe_file()``, so that every start
    on this machine decides alike; a process reads the record, or measures and records it while holding the
    file's lock (a process started beside it waits for those figures rather than measuring under that load)."""
    width, batch, tokens = PROBES[tower]
    key = (tower, width, batch, tokens)
    with _probe_lock:
        if key not in _speedups:
            _speedups[key] = recorded(key, lambda: _measure(width, batch, tokens, AUTO_CANDIDATES[tower], repeat))
        return dict(_speedups[key])


def _machine_key(key: tuple) -> str:
    """``key`` and what picks the kernels on this machine: torch, its CPU capability, the CPU's name, what it runs
    natively (VNNI, AVX512-BF16, AMX: one CPU name covers parts with and without them) and the thread count."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    native = "+".join(sorted(k for k, v in cpu_capabilities().items() if v and k != "avx2")) or "no vnni/bf16/amx"
    return "|".join(map(str, (*key, f"torch {torch.__version__}", torch.backends.cpu.get_cpu_capability(), cpu,
                              native, f"{torch.get_num_threads()} threads")))


def recorded(key: tuple, measure) -> Dict[str, float]:
    """The figures recorded for ``key`` on this machine, else ``measure()`` recorded there; a file that cannot be
    read or written only costs the record (the figures are measured and used)."""
    path = probe_file()
    if path is None:
        return measure()
    name = _machine_key(key)
    lock_fd = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        known = _read_record(path)
        if name in known:
            entry = known[name]
            logger.info("auto: reusing the precision probe recorded in %s on %s", path, entry.get("measured_at"))
            return {k: float(v) for k, v in entry["speedups"].items()}
        figures = measure()
        known[name] = {"speedups": figures, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        logger.info("auto: precision probe measured and recorded in %s (delete it to measure again)", path)
        return figures
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.info("auto: precision probe not recorded (%s); measured in this process", e)
        return measure()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _read_record(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError:  # a damaged record is measured again and rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _measure(width: int, batch: int, tokens: int, candidates, repeat: int) -> Dict[str, float]:
    import torch

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width)).eval()
    x = torch.randn(batch, tokens, width)
    runs = {"float32": (block, x)}
    if "bfloat16" in candidates and native_bfloat16():
        import copy

        runs["bfloat16"] = (copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16))
    if "int8" in candidates:
        runs["int8"] = (per_item_int8(block), x)
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for model, inputs in runs.values():
            model(inputs)  # the first call sets up kernels
        for _ in range(repeat):  # interleaved, so that a moment of load on the machine hits every candidate
            for name, (model, inputs) in runs.items():
                t0 = time.perf_counter()
                model(inputs)
                best[name] = min(best[name], time.perf_counter() - t0)
    return {name: best["float32"] / max(t, 1e-9) for name, t in best.items() if name != "float32"}


def choose(dtype: Optional[str], device: str, tower: str = "image") -> Precision:
    """The precision for ``dtype`` (any spelling; None = auto) on ``device`` for the ``tower`` ("image" or
    "text") that will mostly run, or ValueError naming why not. ``auto`` on a CPU measures: it picks the
    first of the tower's candidates (AUTO_CANDIDATES) that beats float32 by MIN_SPEEDUP on this CPU, else
    float32; bfloat16 is a candidate only where the CPU runs it natively (emulated: 8x slower)."""
    name = dtype_name(dtype or DEFAULT_PRECISION, PRECISIONS)
    cuda = str(device).startswith("cuda")
    if name == "auto":
        if cuda:
            return Precision("float16", "auto on cuda: float16")
        native = native_bfloat16()
        cpu = f"native bfloat16: {native}" if native else "no native bfloat16"
        candidates = [c for c in AUTO_CANDIDATES[tower] if c != "bfloat16" or native]
        gains = {k: v for k, v in speedups(tower).items() if k in candidates}
        measured = "measured " + ", ".join(f"{k} {gains[k]:.2f}x" for k in candidates) + " float32"
        for candidate in candidates:  # in order of preference, the first that the probe measures faster
            if gains[candidate] >= MIN_SPEEDUP:
                return Precision(candidate, f"auto on cpu for the {tower} tower: {measured} ({cpu})")
        why = f"{measured}, none {MIN_SPEEDUP}x or more" if candidates else "nothing to try beside it"
        return Precision("float32", f"auto on cpu for the {tower} tower: {why} ({cpu})")
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
