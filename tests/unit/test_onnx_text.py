"""The text tower on ONNX Runtime: the float32 model's embeddings, exported once per model and runtime."""

import logging
import os

import numpy as np
import pytest

from executors.models import loading, onnx_text
from executors.models.loading import load_clip, text_embeddings

from tests.unit.test_model_families import siglip_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.cpu_kind  # ONNX Runtime's int8 kernels differ with VNNI and without (tests/avx2.sh)

TEXTS = ["a photo of a red circle", "blue", "a photo of a green square and a yellow circle", "red red red red"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_text.CACHE_ENV, str(tmp_path / "onnx"))
    monkeypatch.delenv(onnx_text.RUNTIME_ENV, raising=False)
    monkeypatch.delenv(loading.DTYPE_ENV, raising=False)
    loading._cache.clear()
    yield
    loading._cache.clear()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_onnx_runtime_float32_gives_the_float32_models_embeddings(family, tiny_model, siglip_model, monkeypatch):  # noqa: F811
    model = {"clip": tiny_model, "siglip": siglip_model}[family]
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    ort32 = load_clip(model, "cpu", "float32", with_tokenizer=True)
    assert ort32.text_tower is not None and ort32.precision == "float32"
    monkeypatch.delenv(onnx_text.RUNTIME_ENV)
    torch32 = load_clip(model, "cpu", "float32", with_tokenizer=True)
    assert torch32.text_tower is None
    got, want = text_embeddings(ort32, TEXTS), text_embeddings(torch32, TEXTS)
    assert got.shape == want.shape and (got * want).sum(axis=1).min() >= 0.99999
    alone = np.stack([text_embeddings(ort32, [t])[0] for t in TEXTS])
    assert np.abs(alone - got).max() < 1e-5  # the same alone as in a batch of other lengths


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_auto_runs_texts_on_onnx_runtime_in_what_it_measured_keeping_the_embeddings(family, tiny_model, siglip_model):  # noqa: F811
    model = {"clip": tiny_model, "siglip": siglip_model}[family]
    auto = load_clip(model, "cpu", None, with_tokenizer=True)
    assert auto.text_tower is not None and auto.precision in ("float32", "int8")
    want = text_embeddings(load_clip(model, "cpu", "float32", with_tokenizer=True), TEXTS)
    got = text_embeddings(auto, TEXTS)
    assert (got * want).sum(axis=1).min() >= onnx_text.INT8_MIN_COSINE
    alone = np.stack([text_embeddings(auto, [t])[0] for t in TEXTS])
    assert np.abs(alone - got).max() < 1e-6


# texts of one token length run as one batch (no padding): only running each alone keeps an int8 tower's
# activation scale a text's own
SAME_LENGTH = ["a red circle", "a blue square", "a green circle", "a yellow square"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_int8_tower_keeps_the_embeddings_and_each_text_its_own(family, tiny_model, siglip_model, monkeypatch):  # noqa: F811
    model = {"clip": tiny_model, "siglip": siglip_model}[family]
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    int8 = load_clip(model, "cpu", "int8", with_tokenizer=True)
    encoding = onnx_text.weight_encoding()
    assert int8.precision == "int8" and int8.text_tower.path.endswith(f"-int8v{onnx_text.INT8_FORMAT}-{encoding}.onnx")
    ids = int8.tokenizer(SAME_LENGTH)["input_ids"]
    assert len({len(row) for row in ids}) == 1
    texts = SAME_LENGTH + TEXTS
    want = text_embeddings(load_clip(model, "cpu", "float32", with_tokenizer=True), texts)
    got = text_embeddings(int8, texts)
    assert (got * want).sum(axis=1).min() >= onnx_text.INT8_MIN_COSINE
    assert not np.array_equal(got, want)  # it is int8 indeed
    alone = np.stack([text_embeddings(int8, [t])[0] for t in texts])
    assert np.abs(alone - got).max() < 1e-6


def test_the_weights_are_int8_only_where_vnni_multiplies_them_exactly(monkeypatch):
    from executors.models import precision

    for vnni, want in ((True, "s8"), (False, "u8")):
        monkeypatch.setattr(precision, "cpu_capabilities", lambda vnni=vnni: {"vnni": vnni, "avx512_bf16": False,
                                                                             "amx": False, "avx2": True})
        assert onnx_text.weight_encoding() == want


@pytest.mark.parametrize("encoding", ["s8", "u8"])
def test_quantize_int8_writes_the_weights_in_the_encoding_asked_for(encoding, tiny_model, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    f32 = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True).text_tower
    dst = str(tmp_path / f"int8-{encoding}.onnx")
    changed = onnx_text.quantize_int8(f32.path, dst, encoding)
    model = onnx.load(dst)
    quantized = [node for node in model.graph.node if node.op_type == "DynamicQuantizeMatMul"]
    assert changed == len(quantized) > 0 and not any(
        node.op_type == "MatMul" and node.input[1] in {i.name for i in model.graph.initializer} for node in model.graph.node)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in quantized:
        weight = init[node.input[1]]
        assert weight.dtype == {"s8": np.int8, "u8": np.uint8}[encoding]
        if encoding == "u8":  # the same 255 levels around 128: 1..255, with zero point 128 for every column
            assert weight.min() >= 1 and np.array_equal(init[node.input[3]], np.full(weight.shape[1], 128, np.uint8))
        else:
            assert node.input[3:4] in ([], [""]) and weight.min() >= -127
    # uint8 x uint8 sums without saturating on every CPU: its embeddings stay the float32 export's
    if encoding == "u8":
        tokenizer = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True).tokenizer
        tokens = {k: v for k, v in tokenizer(TEXTS[:1], return_tensors="np").items() if k in f32.input_names}
        got, want = onnx_text.OnnxTextTower(dst, f32.input_names, 1)(tokens).ravel(), f32(tokens).ravel()
        assert got @ want / (np.linalg.norm(got) * np.linalg.norm(want)) >= onnx_text.INT8_MIN_COSINE
    with pytest.raises(ValueError, match="encoding must be s8 or u8, got 'u4'"):
        onnx_text.quantize_int8(f32.path, dst, "u4")


def _session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _token_batches(vocab: int):
    """Token id batches of 1 to 3 texts and of lengths 1 to 16, each text ending in the last id (CLIP's end)."""
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3):
        for length in (1, 2, 7, 16):
            ids = rng.integers(1, vocab - 1, (batch, length)).astype(np.int64)
            ids[:, -1] = vocab - 1
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_the_int8_tower_computes_no_shape_at_a_call_and_adds_each_bias_in_its_product(tiny_model, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    f32 = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True).text_tower
    exported = onnx.load(f32.path)
    initializers = lambda graph: {i.name for i in graph.initializer}  # noqa: E731
    computed = [n for n in exported.graph.node if n.op_type == "Reshape" and n.input[1] not in initializers(exported.graph)]
    assert computed  # what the exporter writes: target shapes worked out from Shape nodes at every call
    dst = str(tmp_path / "int8.onnx")
    onnx_text.quantize_int8(f32.path, dst, onnx_text.weight_encoding())  # as `auto` makes it on this CPU
    graph = onnx.load(dst).graph
    still_computed = [n for n in graph.node if n.op_type == "Reshape" and n.input[1] not in initializers(graph)]
    assert len(still_computed) <= 1 < len(computed)  # one is left: the attention mask's, made once per call
    assert sum(n.op_type == "Shape" for n in graph.node) < sum(n.op_type == "Shape" for n in exported.graph.node) / 2
    products = {n.output[0]: n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"}
    with_bias = [n for n in products.values() if len(n.input) == 5 and n.input[4] in initializers(graph)]
    assert len(with_bias) == len(products) - 1  # every Linear's bias; the projection has none
    assert not any(n.op_type == "Add" and set(n.input) & set(products) and set(n.input) & initializers(graph)
                   for n in graph.node)
    # the same embeddings as the float32 export, for batches and lengths other than the sample's
    vocab = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True).tokenizer.vocab_size
    int8, reference = _session(dst), _session(f32.path)
    for feed in _token_batches(vocab):
        got, want = int8.run(None, feed)[0], reference.run(None, feed)[0]
        cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert got.shape == want.shape and cosine.min() >= onnx_text.INT8_MIN_COSINE


def test_static_reshapes_keep_the_exports_answers_and_leave_a_graph_they_cannot_infer(tiny_model, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    clip = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True)
    model = onnx.load(clip.text_tower.path)
    before = len(model.graph.node)
    assert onnx_text.static_reshapes(model) > 0 and len(model.graph.node) < before
    path = clip.text_tower.path + ".static.onnx"
    onnx.save(model, path)
    static, reference = _session(path), _session(clip.text_tower.path)
    for feed in _token_batches(clip.tokenizer.vocab_size):
        assert np.abs(static.run(None, feed)[0] - reference.run(None, feed)[0]).max() < 1e-5
    # shapes that cannot be inferred (an input of no known rank): the graph is left as it was
    broken = onnx.load(clip.text_tower.path)
    broken.graph.input[0].type.tensor_type.ClearField("shape")
    broken.graph.input[1].type.tensor_type.ClearField("shape")
    nodes = [n.SerializeToString() for n in broken.graph.node]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    changed = onnx_text.static_reshapes(broken)
    assert changed == 0 and [n.SerializeToString() for n in broken.graph.node] == nodes
    assert os.listdir(tmp_path / "cwd") == []  # and nothing written where it ran


def test_auto_takes_int8_only_where_it_measures_faster_and_keeps_the_embeddings(tiny_model, monkeypatch, caplog):
    gains = []
    monkeypatch.setattr(onnx_text, "int8_speedup", lambda f32, int8, sample: gains.pop(0))
    caplog.set_level(logging.INFO, logger="executors.models.loading")
    gains[:] = [3.0]
    fast = load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    assert fast.precision == "int8" and "int8 (measured 3.00x its float32 export on one query, cosine" in caplog.text
    loading._cache.clear()
    gains[:] = [1.1]
    slow = load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    assert slow.precision == "float32" and "-int8" not in slow.text_tower.path
    assert "float32 (int8 measured 1.10x its float32 export on one query" in caplog.text and "under 1.2x" in caplog.text
    loading._cache.clear()
    gains[:] = [3.0]
    monkeypatch.setattr(onnx_text, "INT8_MIN_COSINE", 1.01)  # no int8 tower keeps that
    loose = load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    assert loose.precision == "float32" and "float32: int8 keeps only cosine" in caplog.text
    assert gains == [3.0]  # not measured: its embeddings already ruled it out


def test_the_int8_tower_is_cached_and_made_again_when_damaged(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    path = load_clip(tiny_model, "cpu", "int8", with_tokenizer=True).text_tower.path
    assert os.path.dirname(path) == str(tmp_path / "onnx")

    def refuse(*args):
        raise AssertionError("quantized again although the cache holds it")

    monkeypatch.setattr(onnx_text, "quantize_int8", refuse)
    loading._cache.clear()
    assert load_clip(tiny_model, "cpu", "int8", with_tokenizer=True).text_tower.path == path
    monkeypatch.undo()
    monkeypatch.setenv(onnx_text.CACHE_ENV, str(tmp_path / "onnx"))
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    with open(path, "wb") as f:
        f.write(b"not an onnx model")
    loading._cache.clear()
    again = load_clip(tiny_model, "cpu", "int8", with_tokenizer=True)
    assert again.precision == "int8" and os.path.getsize(path) > 1000


def test_the_export_is_cached_and_made_again_for_a_changed_model(tiny_model, tmp_path, monkeypatch):
    load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    files = [f for f in os.listdir(tmp_path / "onnx") if f.endswith(".onnx") and "-int8" not in f]
    assert len(files) == 1

    def refuse(*args):
        raise AssertionError("exported again although the cache holds this model's export")

    monkeypatch.setattr(onnx_text, "_export", refuse)
    loading._cache.clear()
    assert load_clip(tiny_model, "cpu", None, with_tokenizer=True).text_tower is not None
    # a damaged cached file is exported again
    (tmp_path / "onnx" / files[0]).write_bytes(b"not an onnx model")
    monkeypatch.undo()
    monkeypatch.setenv(onnx_text.CACHE_ENV, str(tmp_path / "onnx"))
    loading._cache.clear()
    tower = load_clip(tiny_model, "cpu", None, with_tokenizer=True).text_tower
    assert tower is not None and os.path.getsize(tower.path) > 1000


def test_a_changed_model_folder_gets_its_own_export(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    first = load_clip(str(copy), "cpu", None, with_tokenizer=True).text_tower.path
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, (1, 1))  # the weights file changed
    loading._cache.clear()
    second = load_clip(str(copy), "cpu", None, with_tokenizer=True).text_tower.path
    assert first != second


def test_a_failed_export_keeps_the_text_tower_on_torch(tiny_model, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("torch.onnx.export failed: an operator it cannot write")

    monkeypatch.setattr(onnx_text, "_export", broken)
    with caplog.at_level(logging.WARNING, logger="executors.models.loading"):
        clip = load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    assert clip.text_tower is None and clip.precision == "float32"
    assert "stays on torch: torch.onnx.export failed" in caplog.text
    assert text_embeddings(clip, TEXTS).shape[0] == len(TEXTS)
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")  # asked for by name: an error, not a fallback
    loading._cache.clear()
    with pytest.raises(loading.ModelLoadError, match="cannot run the text tower .* on ONNX Runtime"):
        load_clip(tiny_model, "cpu", None, with_tokenizer=True)


def test_the_towers_threads_stop_spinning_when_a_call_returns(tmp_path):
    """ONNX Runtime's pool threads spin after each call unless told otherwise, taking a CPU from the flow's next
    process (the indexer's scan) while the text encoder has nothing to do."""
    import time

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = 768
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((width, width)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "products", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], [weight])
    path = str(tmp_path / "products.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    tower = onnx_text.OnnxTextTower(path, ["input_ids"], threads=2)
    tokens = {"input_ids": np.ones((512, width), dtype=np.int64)}  # big enough for the pool to share it out
    for _ in range(3):
        tower(tokens)
    burnt = []
    for _ in range(5):
        tower(tokens)
        start = time.process_time()
        time.sleep(0.05)
        burnt.append(time.process_time() - start)
    assert float(np.median(burnt)) < 0.01, f"CPU seconds used in the 50 ms after a call: {burnt}"


def test_the_runtime_setting(tiny_model, monkeypatch):
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "torch")
    assert load_clip(tiny_model, "cpu", None, with_tokenizer=True).text_tower is None
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "onnxruntime")
    with pytest.raises(ValueError, match="runs in float32 or int8; dtype bfloat16 runs on torch"):
        load_clip(tiny_model, "cpu", "bfloat16", with_tokenizer=True)
    monkeypatch.setenv(onnx_text.RUNTIME_ENV, "tensorrt")
    with pytest.raises(ValueError, match="must be auto, torch or onnxruntime"):
        load_clip(tiny_model, "cpu", None, with_tokenizer=True)
    monkeypatch.delenv(onnx_text.RUNTIME_ENV)
    assert load_clip(tiny_model, "cpu", "bfloat16", with_tokenizer=True).text_tower is None  # a precision named
    assert load_clip(tiny_model, "cpu", None).text_tower is None  # the image tower stays on torch


def test_a_cached_file_is_written_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "tower.onnx")

    def half_then_fail(dst):
        with open(dst, "wb") as f:
            f.write(b"half a model")
        raise ValueError("disk full")

    with pytest.raises(RuntimeError, match="cannot write the int8 text tower: ValueError: disk full"):
        onnx_text._cached(path, half_then_fail, open, "int8 text tower")
    assert sorted(os.listdir(tmp_path)) == ["tower.onnx.lock"]  # neither the half file nor its temporary

    def unreadable(src):
        raise ValueError(f"cannot parse {src}")

    made = []
    with pytest.raises(RuntimeError, match="ONNX Runtime cannot read the int8 text tower: cannot parse"):
        onnx_text._cached(path, lambda dst: made.append(open(dst, "wb").close()), unreadable, "int8 text tower")
    assert len(made) == 1 and not os.path.exists(path)  # made once, read back, refused and removed


def _file(folder, name, days_old=0.0):
    path = folder / name
    path.write_bytes(b"an export")
    (folder / f"{name}.lock").write_bytes(b"")
    if days_old:
        old = os.path.getmtime(path) - days_old * 86400
        os.utime(path, (old, old))
    return str(path)


def test_making_a_new_export_removes_the_ones_unused_for_a_month(tmp_path):
    import fcntl

    folder = tmp_path / "onnx"
    folder.mkdir()
    stale = _file(folder, "text-old.onnx", days_old=onnx_text.CACHE_KEEP_DAYS + 5)
    recent = _file(folder, "text-recent.onnx", days_old=onnx_text.CACHE_KEEP_DAYS - 5)
    busy = _file(folder, "text-busy.onnx", days_old=onnx_text.CACHE_KEEP_DAYS + 5)
    (folder / "notes.txt").write_text("not an export")
    os.utime(folder / "notes.txt", (1, 1))
    held = os.open(busy + ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # another process is making or reading it
    try:
        tower, made = onnx_text._cached(str(folder / "text-new.onnx"),
                                        lambda dst: open(dst, "wb").write(b"new"), open, "text tower export")
        tower.close()
    finally:
        os.close(held)
    assert made
    assert sorted(os.listdir(folder)) == ["notes.txt", "text-busy.onnx", "text-busy.onnx.lock", "text-new.onnx",
                                          "text-new.onnx.lock", "text-recent.onnx", "text-recent.onnx.lock"]
    assert not os.path.exists(stale) and os.path.exists(recent)


def test_an_export_read_from_the_cache_counts_as_used(tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    used = _file(folder, "text-used.onnx", days_old=onnx_text.CACHE_KEEP_DAYS + 5)
    tower, made = onnx_text._cached(used, lambda dst: pytest.fail("made again"), open, "text tower export")
    tower.close()
    assert not made
    onnx_text._cached(str(folder / "text-new.onnx"), lambda dst: open(dst, "wb").close(), open,
                      "text tower export")[0].close()
    assert os.path.exists(used)  # opened today: kept


@pytest.mark.parametrize("encoding", ["s8", "u8"])
def test_a_weight_two_products_read_is_quantized_once_and_each_bias_follows_its_product(encoding, tmp_path):
    """Two Linears reading one stored weight, one of them through an Identity alias (as the exporter writes a
    tensor it found twice), each with a bias that is also an alias: a valid file, each output its Linear's."""
    import onnx

    if encoding == "s8" and onnx_text.weight_encoding() != "s8":
        pytest.skip("int8 weights saturate in ONNX Runtime's uint8 x int8 kernel without VNNI; "
                    "weight_encoding() takes uint8 on this CPU")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b1, b2 = rng.standard_normal((8, 4)).astype(np.float32), np.full(4, 0.5, np.float32), np.full(4, -1.0, np.float32)
    nodes = [helper.make_node("Identity", ["w"], ["w_alias"]), helper.make_node("Identity", ["b2"], ["b2_alias"]),
             helper.make_node("MatMul", ["x", "w"], ["p1"]), helper.make_node("Add", ["p1", "b1"], ["y1"]),
             helper.make_node("MatMul", ["x", "w_alias"], ["p2"]), helper.make_node("Add", ["b2_alias", "p2"], ["y2"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 4]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(a, name) for a, name in ((w, "w"), (b1, "b1"), (b2, "b2"))])
    src, dst = str(tmp_path / "two.onnx"), str(tmp_path / "two-int8.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    assert onnx_text.quantize_int8(src, dst, encoding) == 2
    model = onnx.load(dst)
    names = [init.name for init in model.graph.initializer]
    assert len(names) == len(set(names)) and not any(n.op_type in ("MatMul", "Add") for n in model.graph.node)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y1, y2 = _session(dst).run(None, {"x": x})
    assert np.abs(y1 - (x @ w + b1)).max() < 0.1 and np.abs(y2 - (x @ w + b2)).max() < 0.1
