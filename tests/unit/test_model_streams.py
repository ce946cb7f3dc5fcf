"""A batch of images split to run side by side on a CPU (``model_streams``): which threads run the parts, with how
many torch threads each, and that the embeddings are those of the whole batch on every thread."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from docarray import DocList

import executors.models.loading as loading
from executors.clip_image_encoder import CLIPImageEncoder
from executors.docs import ImageInput, TextQuery
from executors.params import RequestError

needs_two_threads = pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two torch threads (one CPU, or CLIPSEEK_TORCH_THREADS=1)")


class _Calls(list):
    side_by_side = None


@pytest.fixture
def calls(monkeypatch):
    """(thread name, torch threads on that thread, batch length) of every image model call. A call on a stream
    thread waits for its batch's other parts to start (``side_by_side`` sets how many), so that parts that ran
    one after another on one thread fail instead of passing by timing."""
    seen = _Calls()
    real = loading._image_embeddings
    parts = {"barrier": None}

    def spy(clip, pixel_values, threads=None):
        if threading.current_thread().name.startswith(f"{loading.MODEL_THREAD}-stream") and parts["barrier"]:
            parts["barrier"].wait(timeout=30)
        out = real(clip, pixel_values, threads)
        seen.append((threading.current_thread().name, torch.get_num_threads(), len(pixel_values)))
        return out

    def side_by_side(n):
        parts["barrier"] = threading.Barrier(n)

    monkeypatch.setattr(loading, "_image_embeddings", spy)
    seen.side_by_side = side_by_side
    return seen


def _embed(encoder, paths):
    docs = DocList[ImageInput]([ImageInput(url=p) for p in paths])
    encoder.encode(docs)
    assert all(d.embedding is not None for d in docs), [d.error for d in docs]
    return np.stack([d.embedding for d in docs])


@needs_two_threads
def test_a_batch_runs_in_parts_side_by_side_on_a_share_of_the_threads_each(tiny_model, picture_dir, calls):
    _, paths = picture_dir
    total = loading.process_threads()
    streams = min(total, len(paths), loading.MAX_STREAMS)
    calls.side_by_side(streams)
    split = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, batch_size=len(paths), dtype="float32")
    whole = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, batch_size=len(paths), dtype="float32",
                             model_streams=1)
    try:
        got = _embed(split, paths)
        names = {name for name, _, _ in calls}
        assert sorted(n for _, _, n in calls) == sorted(len(p) for p in np.array_split(paths, streams)), calls
        assert len(names) == streams and all(n.startswith(f"{loading.MODEL_THREAD}-stream") for n in names)
        assert {threads for _, threads, _ in calls} == {total // streams}
        calls.clear()
        want = _embed(whole, paths)  # the whole batch on every thread, on the one model thread
        assert [(name, threads, n) for name, threads, n in calls] == [(f"{loading.MODEL_THREAD}_0", total, len(paths))]
        np.testing.assert_allclose(got, want, atol=1e-6)
        calls.clear()
        _embed(split, paths + paths[:1])  # batch size 4: a batch of four in parts, then one picture alone
        alone = [call for call in calls if not call[0].startswith(f"{loading.MODEL_THREAD}-stream")]
        assert alone == [(f"{loading.MODEL_THREAD}_0", total, 1)] and len(calls) == streams + 1, calls
    finally:
        split.close()
        whole.close()


@needs_two_threads
def test_a_query_picture_takes_every_thread(tiny_model, picture_dir, calls):
    """A query's picture (a batch of one) is not held to a part's share of the threads."""
    _, paths = picture_dir
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, batch_size=8, dtype="float32")
    try:
        query = DocList[TextQuery]([TextQuery(url=paths[0])])
        encoder.encode_queries(query)
        assert query[0].embedding is not None
    finally:
        encoder.close()
    assert [(threads, n) for _, threads, n in calls] == [(loading.process_threads(), 1)]


def test_a_batch_submitted_from_a_model_thread_runs_there(tiny_model):
    """The one-stream path from the model thread itself runs in place (waiting on its own pool would hang)."""
    from executors.images.imaging import Preprocess

    clip = loading.load_clip(tiny_model, "cpu", "float32")
    recipe = Preprocess.from_processor_config(clip.processor_config)
    pixels = np.random.default_rng(0).standard_normal((2, 3, recipe.crop_height, recipe.crop_width)).astype(np.float32)
    future = loading.on_model_thread(lambda: loading.submit_image_embeddings(clip, pixels, 1))
    assert future.done()
    np.testing.assert_allclose(future.result(), loading.image_embeddings(clip, pixels), atol=1e-6)


def test_streams_are_one_on_a_gpu_and_capped(tiny_model):
    clip = loading.load_clip(tiny_model, "cpu", "float32")
    assert loading.image_streams(clip, 1) == 1
    assert loading.image_streams(clip) == min(loading.process_threads(), loading.MAX_STREAMS)
    assert loading.image_streams(clip, 1000) == min(loading.process_threads(), 1000)
    assert loading.image_streams(dataclasses.replace(clip, device="cuda:0")) == 1


@pytest.mark.parametrize("bad", [0, -1, "two"])
def test_model_streams_must_be_a_positive_integer(tiny_model, bad):
    with pytest.raises(ValueError, match="model_streams"):
        CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, dtype="float32", model_streams=bad)


def test_a_request_cannot_set_model_streams(tiny_model, picture_dir):
    _, paths = picture_dir
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, dtype="float32", model_streams=1)
    try:
        with pytest.raises(RequestError, match="'model_streams' is fixed when the server starts"):
            encoder.encode(DocList[ImageInput]([ImageInput(url=paths[0])]), parameters={"model_streams": 8})
    finally:
        encoder.close()


def test_embed_in_order_gives_each_batch_its_own_embeddings_in_order(tiny_model):
    from executors.images.imaging import Preprocess

    clip = loading.load_clip(tiny_model, "cpu", "float32")
    recipe = Preprocess.from_processor_config(clip.processor_config)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 3, recipe.crop_height, recipe.crop_width)).astype(np.float32) for n in (3, 1, 4)]
    for streams in (1, loading.image_streams(clip)):
        got = list(loading.embed_in_order(clip, iter(batches), streams))
        assert [len(g) for g in got] == [3, 1, 4]
        for g, pixels in zip(got, batches):
            np.testing.assert_allclose(g, loading.image_embeddings(clip, pixels), atol=1e-6)
