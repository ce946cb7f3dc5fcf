"""Encoder executors called directly: parity with transformers, batching, errors, parameters."""

import base64

import numpy as np
import pytest
import torch
from docarray import DocList
from jina import Executor
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from executors.clip_image_encoder import CLIPImageEncoder
from executors.models.loading import ModelLoadError, load_clip
from executors.clip_text_encoder import CLIPTextEncoder
from executors.docs import STATUS_FAILED, ImageInput, QueryPart, TextQuery

from tests.conftest import draw_picture


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def reference(tiny_model):
    model = CLIPModel.from_pretrained(tiny_model).eval()
    return model, CLIPImageProcessor.from_pretrained(tiny_model), CLIPTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def image_encoder(tiny_model):
    return CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, batch_size=2, dtype="float32")  # parity of the pipeline; tests/unit/test_precision.py checks the others


@pytest.fixture(scope="module")
def text_encoder(tiny_model):
    return CLIPTextEncoder(pretrained_model_name_or_path=tiny_model, dtype="float32")


def test_image_parity_with_transformers(image_encoder, reference, picture_dir):
    model, processor, _ = reference
    _, paths = picture_dir
    docs = DocList[ImageInput]([ImageInput(url=p) for p in paths])
    image_encoder.encode(docs)
    with torch.inference_mode():
        pixel_values = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixel_values)
    expected = _unit(getattr(out, "pooler_output", out).numpy())
    got = np.stack([d.embedding for d in docs])
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = (_unit(got) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_served_text_endpoints_run_the_whole_request_on_the_model_thread(text_encoder, monkeypatch):
    """/search and /classify are coroutines that hand the request to the model thread in one step (no
    thread of jina's pool in between): the work runs there, and the event loop is free meanwhile."""
    import asyncio
    import threading

    from executors.models.loading import MODEL_THREAD

    ran_on = []
    for name in ("encode", "encode_labels"):
        work = getattr(CLIPTextEncoder, name)

        def spy(self, *args, _work=work, **kwargs):
            ran_on.append(threading.current_thread().name)
            return _work(self, *args, **kwargs)

        monkeypatch.setattr(CLIPTextEncoder, name, spy)

    async def both():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        found = await text_encoder.serve_search(DocList[TextQuery]([TextQuery(text="a red circle")]))
        labels = await text_encoder.serve_classify(
            DocList[TextQuery]([TextQuery(parts=DocList[QueryPart]([QueryPart(text="cat"), QueryPart(text="dog")]))]))
        ticker.cancel()
        return found, labels, ticks

    found, labels, ticks = asyncio.run(both())
    assert found[0].embedding is not None and all(p.embedding is not None for p in labels[0].parts)
    assert [n.startswith(MODEL_THREAD) for n in ran_on] == [True, True], ran_on
    assert ticks > 0  # the loop ran other work while the model thread encoded


def test_text_parity_with_transformers(text_encoder, reference):
    model, _, tokenizer = reference
    texts = ["a red circle", "a photo of a blue square", "green"]
    docs = DocList[TextQuery]([TextQuery(text=t) for t in texts])
    text_encoder.encode(docs)
    with torch.inference_mode():
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        out = model.get_text_features(**tokens)
    expected = _unit(getattr(out, "pooler_output", out).numpy())
    cosines = (_unit(np.stack([d.embedding for d in docs])) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_every_input_form_gives_the_same_embedding(image_encoder, tmp_path):
    path = draw_picture(tmp_path / "p.png", "red")
    data = open(path, "rb").read()
    pixels = np.asarray(Image.open(path).convert("RGB"))
    docs = DocList[ImageInput]([
        ImageInput(url=path),
        ImageInput(url=f"file://{path}"),
        ImageInput(url="data:image/png;base64," + base64.b64encode(data).decode()),
        ImageInput(bytes_=data),
        ImageInput(tensor=pixels),
    ])
    image_encoder.encode(docs)
    vectors = np.stack([d.embedding for d in docs])
    np.testing.assert_allclose(vectors, np.broadcast_to(vectors[0], vectors.shape), atol=1e-5)
    assert docs[0].content_hash and docs[0].mtime and docs[0].size == len(data)
    assert (docs[0].width, docs[0].height) == (96, 72)
    assert all(d.bytes_ is None and d.tensor is None for d in docs)  # pixels are not sent on to the indexer


def test_broken_image_costs_only_itself(image_encoder, tmp_path, picture_dir):
    _, paths = picture_dir
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    docs = DocList[ImageInput]([ImageInput(url=paths[0]), ImageInput(url=str(broken)), ImageInput(url=str(empty)),
                                ImageInput(url=str(tmp_path / "missing.png")), ImageInput(), ImageInput(url=paths[1])])
    image_encoder.encode(docs)
    assert docs[0].embedding is not None and docs[5].embedding is not None
    for doc, needle in zip(docs[1:5], ["broken.jpg", "empty.png", "missing.png", "no url, bytes_ or tensor"]):
        assert doc.embedding is None and doc.status == STATUS_FAILED
        assert needle in doc.error


def test_batch_size_parameter_is_read(image_encoder, picture_dir, monkeypatch):
    import executors.clip_image_encoder as module

    _, paths = picture_dir
    sizes = []
    real = module.submit_image_embeddings
    monkeypatch.setattr(module, "submit_image_embeddings",
                        lambda clip, px, streams: sizes.append(len(px)) or real(clip, px, streams))
    image_encoder.encode(DocList[ImageInput]([ImageInput(url=p) for p in paths]), parameters={"batch_size": 1})
    assert sizes == [1, 1, 1, 1]
    sizes.clear()
    image_encoder.encode(DocList[ImageInput]([ImageInput(url=p) for p in paths]))
    assert sizes == [2, 2]  # the constructor default again
    for too_many in (0, 3):  # a request may lower the server's batch size, never raise it
        with pytest.raises(ValueError, match="'batch_size': must be an integer from 1 to 2"):
            image_encoder.encode(DocList[ImageInput]([ImageInput(url=paths[0])]), parameters={"batch_size": too_many})


def test_text_runs_unpadded_by_length_and_truncates(text_encoder, monkeypatch, tiny_model):
    clip = load_clip(tiny_model, None, "float32", with_tokenizer=True)  # the one the fixture's encoder uses
    lengths = []
    real = clip.model.get_text_features

    def spy(**tokens):
        lengths.append(tokens["input_ids"].shape[1])
        return real(**tokens)

    monkeypatch.setattr(clip.model, "get_text_features", spy)
    docs = DocList[TextQuery]([TextQuery(text="red"), TextQuery(text="a red circle")])
    text_encoder.encode(docs)
    assert sorted(lengths) == [3, 5]  # <start> red <end> and <start> a red circle <end>: no padding, not 77
    long_doc = DocList[TextQuery]([TextQuery(text="red " * 10_000)])
    text_encoder.encode(long_doc)
    assert lengths[-1] == 77 and long_doc[0].embedding is not None


def test_empty_text_is_left_unembedded_and_parts_are_embedded(text_encoder):
    from executors.docs import QueryPart

    docs = DocList[TextQuery]([TextQuery(text="   "), TextQuery(text="blue", parts=DocList[QueryPart]([
        QueryPart(text="red", weight=-0.5), QueryPart(url="/some/image.png")]))])
    text_encoder.encode(docs)
    assert docs[0].embedding is None and docs[0].error is None  # the indexer answers an empty query
    assert docs[1].embedding is not None and docs[1].error is None
    assert docs[1].parts[0].embedding is not None and docs[1].parts[1].embedding is None


def test_access_paths_reach_nested_documents(tiny_model, picture_dir):
    from docarray import BaseDoc

    class Album(BaseDoc):
        photos: DocList[ImageInput]

    _, paths = picture_dir
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, access_paths="photos")
    albums = DocList[Album]([Album(photos=DocList[ImageInput]([ImageInput(url=p) for p in paths[:2]]))])
    encoder.encode(albums)
    assert all(p.embedding is not None for p in albums[0].photos)


def test_config_yml_loads(tiny_model):
    encoder = Executor.load_config("executors/clip_image_encoder.yml", uses_with={"pretrained_model_name_or_path": tiny_model})
    assert type(encoder).__name__ == "CLIPImageEncoder" and encoder.defaults["batch_size"] == 32
    text = Executor.load_config("executors/clip_text_encoder.yml", uses_with={"pretrained_model_name_or_path": tiny_model})
    assert type(text).__name__ == "CLIPTextEncoder"


def test_device_and_dtype_choices():
    from executors.models.precision import choose

    if not torch.cuda.is_available():
        from executors.models.loading import resolve_device

        assert resolve_device(None) == "cpu"
        with pytest.raises(ValueError, match="float16 needs a cuda device"):
            choose("float16", "cpu")
    assert choose("bf16", "cpu").name == "bfloat16" and choose("bfloat16", "cpu").input_dtype is torch.bfloat16
    assert choose("int8", "cpu").input_dtype is torch.float32
    with pytest.raises(ValueError, match="cpu only"):
        choose("int8", "cuda")
    with pytest.raises(ValueError, match="not one of"):
        choose("int4", "cpu")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline: a hub name loads only from a cache, and this one holds nothing, whatever
    this machine has downloaded before (nor does this process's cache of loaded models)."""
    from collections import OrderedDict

    from huggingface_hub import constants

    from executors.models import loading

    monkeypatch.setattr(loading, "_cache", OrderedDict())

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", cache.parent), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_unreachable_model_names_it_and_says_what_to_do(tmp_path, empty_hub_cache):
    with pytest.raises(ModelLoadError) as err:
        load_clip("openai/clip-vit-base-patch32", "cpu", "float32")
    message = str(err.value)
    assert "openai/clip-vit-base-patch32" in message
    assert "--model DIR" in message and "CLIPSEEK_MODEL" in message
    assert "Traceback" not in message
    with pytest.raises(ModelLoadError, match="from folder"):
        load_clip(str(tmp_path), "cpu", "float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_on_cuda_matches_float32(tiny_model, picture_dir):
    _, paths = picture_dir
    f32 = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, device="cuda", dtype="float32")  # auto is float16 on cuda
    f16 = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, device="cuda", dtype="float16")
    a, b = (DocList[ImageInput]([ImageInput(url=p) for p in paths]) for _ in range(2))
    f32.encode(a)
    f16.encode(b)
    assert f32._load(f32.defaults).precision == "float32" and f16._load(f16.defaults).precision == "float16"
    cos = (np.stack([d.embedding for d in a]) * np.stack([d.embedding for d in b])).sum(1)
    assert cos.min() > 0.99


def test_models_run_on_one_thread_whoever_calls_them(tiny_model):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from executors.models import loading as clip_model

    clip = load_clip(tiny_model, "cpu", "float32", with_tokenizer=True)
    seen = []
    real = clip_model._text_features

    def spy(*args):
        seen.append(threading.current_thread().name)
        return real(*args)

    clip_model._text_features = spy
    try:
        with ThreadPoolExecutor(4) as pool:  # as a server's pool calls the executor
            vectors = list(pool.map(lambda t: clip_model.text_embeddings(clip, [t]), ["red", "green", "blue", "a photo"] * 3))
    finally:
        clip_model._text_features = real
    assert len(seen) == 12 and len(set(seen)) == 1 and seen[0].startswith(clip_model.MODEL_THREAD)
    np.testing.assert_allclose(vectors[0], clip_model.text_embeddings(clip, ["red"]), atol=1e-6)
    # nested calls run in place instead of waiting on themselves; errors come back to the caller
    assert clip_model.on_model_thread(clip_model.on_model_thread, threading.current_thread).name == seen[0]
    with pytest.raises(ZeroDivisionError):
        clip_model.on_model_thread(lambda: 1 / 0)
    clip_model._reset_model_thread()  # what a forked child does: a thread of its own on first use
    assert clip_model.on_model_thread(threading.current_thread).name.startswith(clip_model.MODEL_THREAD)


def test_model_folder_saved_with_a_processor_loads(tiny_model, tmp_path):
    """A folder written by CLIPProcessor.save_pretrained holds processor_config.json, not
    preprocessor_config.json: it loads as transformers loads it."""
    import shutil

    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    folder = tmp_path / "processor-folder"
    shutil.copytree(tiny_model, folder)
    (folder / "preprocessor_config.json").unlink()
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=CLIPTokenizer.from_pretrained(tiny_model)).save_pretrained(folder)
    assert (folder / "processor_config.json").exists() and not (folder / "preprocessor_config.json").exists()
    from executors.models.loading import check_model_available

    check_model_available(str(folder))
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=str(folder), device="cpu")
    clip = encoder._load(encoder.defaults)
    assert clip.processor_config["size"] == {"shortest_edge": 48}  # what the saved processor says, not a default
    docs = DocList[ImageInput]([ImageInput(url=draw_picture(tmp_path / "p.png", "red"))])
    encoder.encode(docs)
    assert docs[0].embedding is not None and docs[0].error is None


def test_model_folder_without_processor_settings_names_both_files(tiny_model, tmp_path):
    import shutil

    from executors.models.loading import ModelLoadError, check_model_available

    folder = tmp_path / "no-processor"
    shutil.copytree(tiny_model, folder)
    (folder / "preprocessor_config.json").unlink()
    for check in (lambda: check_model_available(str(folder)),
                  lambda: CLIPImageEncoder(pretrained_model_name_or_path=str(folder), device="cpu")):
        with pytest.raises(ModelLoadError) as e:
            check()
        assert "preprocessor_config.json" in str(e.value) and "processor_config.json" in str(e.value).replace(
            "preprocessor_config.json", "")
