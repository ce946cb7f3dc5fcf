"""The text tower on ONNX Runtime: the same transformers weights, exported once, run without eager PyTorch.

A short query spends most of its time in eager PyTorch's per-operator overhead, not in arithmetic; the same
graph run by ONNX Runtime (float32, so the embedding is the float32 model's) takes about half the time on
both AVX2 and AVX512 CPUs (benchmarks/search_latency.py prints both side by side). The export is made at
the first load from the model the encoder has just loaded (``torch.onnx.export``, TorchScript exporter,
dynamic batch and length), checked against that model on a sample text, and cached in
``cache_folder()`` under a key of the model's files (their names, sizes and times), the exported inputs,
torch's and ONNX Runtime's versions: a changed model or a new runtime exports again, and making a new file
removes those not opened for ``CACHE_KEEP_DAYS`` (``prune_cache``). A model whose export fails or disagrees
keeps running on torch (logged); ``CLIPSEEK_TEXT_RUNTIME=torch`` asks for torch always.

A short query is bound by reading the tower's weights (150 MB in float32 for ViT-B/32's text tower), so
``auto`` also tries an int8 copy of the export (``quantize_int8``: each weight matrix in 8 bits with one scale
per output column, activations quantized per call, each text run on its own so its embedding never depends
on its batch; each Linear's bias added inside its product, and the reshapes' target shapes written as constants
where the exporter computes them from other shapes at every call: half the export's nodes). The weights'
encoding follows the CPU (``weight_encoding``): int8 where VNNI multiplies uint8 activations by int8 weights
exactly, uint8 around 128 elsewhere (AVX2), where ONNX Runtime's uint8 x int8 kernel adds pairs of products in
int16 and saturates. It is used only where every sample text keeps cosine ``INT8_MIN_COSINE`` to the torch
float32 model and it is measured ``MIN_SPEEDUP`` faster than the float32 export on this machine (the figures are
recorded per machine like the precision probe's).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, TypeVar

import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")

RUNTIME_ENV = "CLIPSEEK_TEXT_RUNTIME"  # auto (default), torch or onnxruntime
CACHE_ENV = "CLIPSEEK_ONNX_CACHE"  # the folder of exported models (default ~/.cache/clipseek/onnx)
OPSET = 17
MIN_COSINE = 0.99999  # an export is used only if it gives the torch model's embedding on the sample text
SAMPLE_TEXT = "a photo of a black cat sitting on a red sofa"
# The int8 tower is used only if each of these keeps INT8_MIN_COSINE to the torch float32 model's embedding.
SAMPLE_TEXTS = (SAMPLE_TEXT, "sunset", "two dogs playing in the snow in front of a red wooden house",
                "a close-up photo of a bowl of fruit on a kitchen table", "a diagram", "a red circle",
                "people walking down a busy street at night in the rain, seen from above")
INT8_MIN_COSINE = 0.999
INT8_FORMAT = 3  # how quantize_int8 writes its file: a new format makes the int8 files again


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

    def __init__(self, path: str, input_names: Sequence[str], threads: int, per_item: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        # The pool's threads spin while a call runs (no wake-up between its many small products) and stop when
        # it returns: left spinning they took the next process of the search flow a CPU (38 ms of CPU in the
        # 50 ms after a call; at 100k vectors the indexer's scan on 2 vCPUs took 16.4 ms against 8.7).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.log_severity_level = 3
        self.path = path
        self.input_names = list(input_names)
        self.threads = max(1, int(threads))
        self.per_item = per_item  # each text alone (int8: its activations' scale is its own, never its batch's)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, tokens: Dict[str, Any]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(_numpy(tokens[name]), dtype=np.int64) for name in self.input_names}
        rows = len(next(iter(feed.values())))
        if not self.per_item or rows <= 1:
            return self.session.run(None, feed)[0].astype(np.float32, copy=False)
        return np.concatenate([self.session.run(None, {k: v[i : i + 1] for k, v in feed.items()})[0]
                               for i in range(rows)]).astype(np.float32, copy=False)


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
    tower, exported = _cached(path, lambda dst: _export(model, sample_tokens, input_names, dst),
                              lambda src: OnnxTextTower(src, input_names, threads), "text tower export")
    cosine = _agreement(model, tower, sample_tokens)
    if cosine < MIN_COSINE:
        os.unlink(path)
        raise RuntimeError(f"the export gives cosine {cosine:.6f} to the torch model on a sample text")
    logger.info("text tower on ONNX Runtime %s: %s %s (cosine %.7f to torch float32)", onnxruntime.__version__,
                "exported to" if exported else "read from", path, cosine)
    return tower


def _cached(path: str, make: Callable[[str], Any], open_file: Callable[[str], T], what: str) -> Tuple[T, bool]:
    """(``open_file(path)``, whether the file was made now): the file at ``path`` as cached, or made by
    ``make(dst)`` while holding the file's lock (one process makes it; one started beside it waits, then reads
    it), written whole or not at all; a cached file that cannot be opened is made again, once. Raises
    RuntimeError naming ``what`` if it cannot be made or opened."""
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = False
        while True:
            if not os.path.exists(path):
                _write_whole(path, make, what)
                made = True
            try:
                opened = open_file(path)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: a damaged file is made again
                os.unlink(path)
                if made:
                    raise RuntimeError(f"ONNX Runtime cannot read the {what}: {_first_line(e)}") from None
                logger.warning("cached %s %s is unreadable (%s); making it again", what, path, _first_line(e))
                continue
            if made:
                prune_cache(os.path.dirname(path), keep=path)
            else:
                _touch(path)  # in use: prune_cache keeps it
            return opened, made
    finally:
        os.close(lock)


# An exported file no server has opened for this many days is removed when a new one is made: a new torch,
# ONNX Runtime or model makes new files under new keys, and the old ones (hundreds of MB for ViT-B/32) would
# otherwise stay for good.
CACHE_KEEP_DAYS = 30


def prune_cache(folder: str, keep: str, keep_days: float = CACHE_KEEP_DAYS) -> list:
    """Remove the exported files (``*.onnx``) of ``folder`` last opened more than ``keep_days`` ago, except
    ``keep`` and any whose lock another process holds (one being made). Returns the paths removed."""
    import time

    cutoff = time.time() - keep_days * 86400
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if not name.endswith(".onnx") or os.path.abspath(path) == os.path.abspath(keep):
            continue
        try:
            if os.stat(path).st_mtime >= cutoff:
                continue
            lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            os.unlink(path + ".lock")
            removed.append(path)
        except OSError:  # being made or read right now, or gone already
            pass
        finally:
            os.close(lock)
    if removed:
        logger.info("removed %d exported file(s) unused for %d days from %s", len(removed), keep_days, folder)
    return removed


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _write_whole(path: str, make: Callable[[str], Any], what: str) -> None:
    """``make(tmp)`` then ``tmp`` synced and renamed to ``path``: a crash leaves the whole file or none."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        make(tmp)
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter's and onnx's own errors: the caller keeps what it has
        raise RuntimeError(f"cannot write the {what}: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


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
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, args, path, input_names=input_names, output_names=["features"],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure: the caller keeps torch
        raise RuntimeError(f"torch.onnx.export failed: {type(e).__name__}: {_first_line(e)}") from None


def int8_tower(f32: OnnxTextTower, model: Any, samples: Sequence[Dict[str, Any]]):
    """(the int8 copy of ``f32``'s export, its smallest cosine to the torch float32 ``model`` over ``samples``):
    quantized from the float32 file (``quantize_int8``) and cached beside it. Raises RuntimeError if it cannot
    be made or read."""
    encoding = weight_encoding()
    path = f"{f32.path[: -len('.onnx')]}-int8v{INT8_FORMAT}-{encoding}.onnx"
    tower, _ = _cached(path, lambda dst: quantize_int8(f32.path, dst, encoding),
                       lambda src: OnnxTextTower(src, f32.input_names, f32.threads, per_item=True), "int8 text tower")
    return tower, min(_agreement(model, tower, sample) for sample in samples)


def weight_encoding() -> str:
    """How ``quantize_int8`` stores the weights on this CPU: "s8" (int8) where VNNI's uint8 x int8 dot product
    sums in int32, "u8" (uint8, zero point 128) elsewhere. Without VNNI, ONNX Runtime's uint8 x int8 kernel
    (AVX2, AVX512 core) adds pairs of products in int16, which 255 x 127 twice overflows: the tiny test model's
    embeddings kept only cosine 0.96 to float32 that way on an AVX2 CPU; its uint8 x uint8 kernel widens to
    int16 before it multiplies and keeps 0.9997."""
    from executors.models.precision import cpu_capabilities

    return "s8" if cpu_capabilities()["vnni"] else "u8"


def quantize_int8(src: str, dst: str, encoding: str = "s8") -> int:
    """``src`` (an exported float32 text tower) written to ``dst`` with every MatMul by a constant 2-D weight
    as ONNX Runtime's DynamicQuantizeMatMul: the weight in 8 bits, symmetric, one scale per output column, as
    int8 (``encoding`` "s8") or as uint8 around zero point 128 ("u8", the same 255 levels); the activations
    quantized to uint8 at each call. The bias added to a product (a Linear's) is added by the same node, and
    the shapes the graph would compute at every call are written as constants where they can be
    (``static_reshapes``): a short query runs hundreds of tiny nodes fewer. Returns how many MatMuls it changed."""
    import onnx
    from onnx import helper, numpy_helper

    if encoding not in ("s8", "u8"):
        raise ValueError(f"encoding must be s8 or u8, got {encoding!r}")
    model = onnx.load(src)
    static_reshapes(model)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    readers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.node:  # the exporter names one stored tensor under several names through Identity nodes
        if node.op_type == "Identity" and node.input[0] in weights:
            weights.setdefault(node.output[0], weights[node.input[0]])
    graph_outputs = {out.name for out in graph.output}
    nodes, replaced, absorbed, changed = [], set(), set(), 0
    for node in graph.node:
        if id(node) in absorbed:
            continue
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = numpy_helper.to_array(weight) if weight is not None else None
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            nodes.append(node)
            continue
        inputs = [node.input[0], f"{weight.name}_int8", f"{weight.name}_scale"]
        if encoding == "u8":
            inputs.append(f"{weight.name}_zero")
        if weight.name not in replaced:  # a weight two products read (directly or through an alias) is written once
            scale = np.abs(w).max(axis=0) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            levels = np.clip(np.rint(w / scale), -127, 127)
            graph.initializer.append(numpy_helper.from_array(scale, inputs[2]))
            if encoding == "s8":
                graph.initializer.append(numpy_helper.from_array(levels.astype(np.int8), inputs[1]))
            else:
                graph.initializer.append(numpy_helper.from_array((levels + 128).astype(np.uint8), inputs[1]))
                graph.initializer.append(numpy_helper.from_array(np.full(w.shape[1], 128, np.uint8), inputs[3]))
        outputs = list(node.output)
        add = _bias_add(node.output[0], readers, weights, w.shape[1], graph_outputs)
        if add is not None:
            bias = weights[next(name for name in add.input if name != node.output[0])].name
            inputs = inputs + [""] * (4 - len(inputs)) + [bias]
            outputs = list(add.output)
            absorbed.add(id(add))
        replaced.add(weight.name)
        nodes.append(helper.make_node("DynamicQuantizeMatMul", inputs, outputs,
                                      name=f"{node.name or node.output[0]}_int8", domain="com.microsoft"))
        changed += 1
    if not changed:
        raise RuntimeError("the export has no MatMul by a weight matrix to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph)  # the float32 weights and the bias aliases the new nodes no longer read
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst)
    return changed


def _bias_add(product: str, readers: Dict[str, list], weights: Dict[str, Any], columns: int, graph_outputs):
    """The Add node that alone reads ``product`` and adds a constant float32 vector of ``columns`` to it (a
    Linear's bias), else None."""
    from onnx import numpy_helper

    nodes = readers.get(product, [])
    if product in graph_outputs or len(nodes) != 1 or nodes[0].op_type != "Add" or len(nodes[0].input) != 2:
        return None
    add = nodes[0]
    other = add.input[1] if add.input[0] == product else add.input[0]
    if other == product or other not in weights:
        return None
    bias = numpy_helper.to_array(weights[other])
    return add if bias.dtype == np.float32 and bias.shape == (columns,) else None


def _inferred_shapes(model):
    """``model`` with the symbolic shapes ONNX Runtime's shape inference finds (``batch``, ``tokens``, products
    of them), as far as it gets. Its ``infer_shapes`` would write the model into the working directory where
    some shape stays unknown; the steps it takes are run here instead, keeping what they found."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def static_reshapes(model) -> int:
    """Rewrites in place each Reshape whose target shape the graph computes from other tensors' shapes at every
    call (the exporter's Shape -> Gather -> Unsqueeze -> Concat chains) as a constant, where symbolic shape
    inference gives its output's shape: a fixed size as it is, a size that stays where the input has it as 0
    (ONNX's "copy this dimension"), at most one other as -1. Nodes left unread are dropped. Returns how many
    Reshapes it changed; 0 (the graph as it was) where no shapes can be inferred."""
    from onnx import numpy_helper

    try:
        inferred = _inferred_shapes(model)
    except Exception as e:  # noqa: BLE001 - any failure of the inference leaves the graph as exported
        logger.debug("shapes of the text tower not inferred (%s): its reshapes stay computed", _first_line(e))
        return 0
    dims: Dict[str, list] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        kind = info.type.tensor_type
        if kind.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in kind.shape.dim]
    graph, changed = model.graph, 0
    for node in graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        source, out = dims.get(node.input[0]), dims.get(node.output[0])
        if not source or not out or any(d is None for d in out):
            continue
        shape = [d if isinstance(d, int) else 0 if j < len(source) and source[j] == d else -1 for j, d in enumerate(out)]
        if shape.count(-1) > 1:
            continue
        name = f"{node.output[0]}_static_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        node.input[1] = name
        changed += 1
    _drop_unread(graph)
    return changed


def _drop_unread(graph) -> None:
    """Removes from ``graph`` in place the nodes whose outputs nothing reads (the graph's outputs count as read),
    until none is left, then the stored tensors no node reads."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [node for node in graph.node if not any(out in read for out in node.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def int8_speedup(f32: OnnxTextTower, int8: OnnxTextTower, sample: Dict[str, Any], repeat: int = 9) -> float:
    """float32 export's time / int8 tower's time on one sample query, best of ``repeat`` each, interleaved;
    measured once per machine, model and threads and recorded like the precision probe's figures."""
    import time

    from executors.models import precision

    def measure() -> Dict[str, float]:
        best = {"float32": float("inf"), "int8": float("inf")}
        towers = {"float32": f32, "int8": int8}
        for tower in towers.values():
            tower(sample)  # the first call sets up kernels
        for _ in range(repeat):
            for name, tower in towers.items():
                t0 = time.perf_counter()
                tower(sample)
                best[name] = min(best[name], time.perf_counter() - t0)
        return {"int8": best["float32"] / max(best["int8"], 1e-9)}

    key = ("onnxruntime text tower", os.path.basename(int8.path), f"{f32.threads} threads")
    return float(precision.recorded(key, measure)["int8"])


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
