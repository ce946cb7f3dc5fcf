"""The text tower on ONNX Runtime: the same transformers weights, exported once, run without eager PyTorch.

A short query spends most of its time in eager PyTorch's per-operator overhead, not in arithmetic; the same
graph run by ONNX Runtime (float32, so the embedding is the float32 model's) takes about half the time on
both AVX2 and AVX512 CPUs (benchmarks/search_latency.py prints both side by side). The export is made at
the first load from the model the encoder has just loaded (``torch.onnx.export``, TorchScript exporter,
dynamic batch and length), checked against that model on a sample text, and cached in
``cache_folder()`` under a key of the model's files (their names, sizes and times), the exported inputs,
torch's and ONNX Runtime's versions: a changed model or a new runtime exports again. A model whose export
fails or disagrees keeps running on torch (logged); ``CLIPSEEK_TEXT_RUNTIME=torch`` asks for torch always.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

RUNTIME_ENV = "CLIPSEEK_TEXT_RUNTIME"  # auto (default), torch or onnxruntime
CACHE_ENV = "CLIPSEEK_ONNX_CACHE"  # the folder of exported models (default ~/.cache/clipseek/onnx)
OPSET = 17
MIN_COSINE = 0.99999  # an export is used only if it gives the torch model's embedding on the sample text
SAMPLE_TEXT = "a photo of a black cat sitting on a red sofa"


def runtime_wanted() -> str:
    value = (os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if value not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"{RUNTIME_ENV} must be auto, torch or onnxruntime, got {value!r}")
    return value


def available() -> Optional[str]:
    """ONNX Runtime's version if it and the exporter's ``onnx`` import here, else None."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def cache_folder() -> str:
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return os.path.abspath(os.path.expanduser(folder))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipseek", "onnx")


class OnnxTextTower:
    """``tower(tokens) -> (n, dim) float32`` features (not normalized), from an exported file."""

    def __init__(self, path: str, input_names: Sequence[str], threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = path
        self.input_names = list(input_names)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, tokens: Dict[str, Any]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(_numpy(tokens[name]), dtype=np.int64) for name in self.input_names}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


def load_or_export(model: Any, name_or_path: str, sample_tokens: Dict[str, Any], threads: int) -> OnnxTextTower:
    """The ONNX Runtime text tower of ``model`` (a float32 transformers dual encoder on the cpu): from the cache,
    or exported now. Raises RuntimeError (with the cause) if it cannot be made or does not match ``model``."""
    import onnxruntime
    import torch

    input_names = sorted(sample_tokens)
    key = hashlib.sha256(json.dumps({
        "model": _model_files(name_or_path), "inputs": input_names, "opset": OPSET, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "config": model.config.to_json_string(use_diff=False)},
        sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_folder()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, f"text-{key}.onnx")
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process exports; one started beside it waits and reads the file
        exported = False
        if not os.path.exists(path):
            _export(model, sample_tokens, input_names, path)
            exported = True
        try:
            tower = OnnxTextTower(path, input_names, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: a damaged cached file is made again
            if exported:
                raise RuntimeError(f"ONNX Runtime cannot read the export: {str(e).splitlines()[0][:200]}") from None
            logger.warning("cached text tower %s is unreadable (%s); exporting it again", path, str(e)[:200])
            _export(model, sample_tokens, input_names, path)
            exported = True
            tower = OnnxTextTower(path, input_names, threads)
        cosine = _agreement(model, tower, sample_tokens)
        if cosine < MIN_COSINE:
            os.unlink(path)
            raise RuntimeError(f"the export gives cosine {cosine:.6f} to the torch model on a sample text")
        logger.info("text tower on ONNX Runtime %s: %s %s (cosine %.7f to torch float32)", onnxruntime.__version__,
                    "exported to" if exported else "read from", path, cosine)
        return tower
    finally:
        os.close(lock)


def _text_module(model, input_names):
    """The text tower alone, as a module torch.onnx can trace: tokens in, features out."""
    import torch

    from executors.models.loading import features

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return features(self.model.get_text_features(**dict(zip(input_names, inputs))))

    return TextTower().eval()


def _export(model, sample_tokens, input_names, path: str) -> None:
    import warnings

    import torch

    tower = _text_module(model, input_names)
    args = tuple(torch.as_tensor(_numpy(sample_tokens[n]), dtype=torch.long) for n in input_names)
    axes = {n: {0: "batch", 1: "tokens"} for n in input_names}
    axes["features"] = {0: "batch"}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, args, tmp, input_names=input_names, output_names=["features"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - any exporter failure: the caller keeps torch
        raise RuntimeError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _agreement(model, tower: OnnxTextTower, sample_tokens) -> float:
    import torch

    from executors.models.loading import features

    with torch.inference_mode():
        want = features(model.get_text_features(**{n: torch.as_tensor(_numpy(v), dtype=torch.long)
                                                   for n, v in sample_tokens.items()})).float().numpy()
    got = tower(sample_tokens)
    want, got = want.ravel(), got.ravel()
    return float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got) + 1e-12))


def _model_files(name_or_path: str):
    """What identifies the model's weights: each file of its folder (a local folder, or the hub cache's
    snapshot the name resolves to) with its size and modification time."""
    folder = name_or_path if os.path.isdir(name_or_path) else None
    if folder is None:
        try:
            from transformers.utils import cached_file

            folder = os.path.dirname(cached_file(name_or_path, "config.json"))
        except Exception:  # noqa: BLE001 - unknown: keyed by the name alone
            return [name_or_path]
    folder = os.path.realpath(folder)
    out = [folder]
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
