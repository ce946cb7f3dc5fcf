"""Both flows started from the YAML files over real gRPC on free ports, driven by the client."""

import time

import numpy as np
import pytest
from docarray import DocList

from executors.docs import ImageInput, TextQuery
from executors.images.imaging import uri_id
from clipseek.client import ClipseekClient, ClipseekError
from flows.serving import flows_in_subprocess, free_port
from flows.settings import Settings

from tests.conftest import draw_picture


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("workspace")))
    with flows_in_subprocess(settings):
        yield settings, ClipseekClient(settings.index_address, settings.search_address)


def test_index_then_search_finds_every_indexed_file(served, picture_dir):
    settings, client = served
    root, paths = picture_dir
    client.clear()
    report = client.index([str(root)], batch_size=3)
    assert sorted(report.indexed) == paths and not report.failed and not report.unchanged
    hits = client.search("a red circle", limit=10)
    assert sorted(h.uri for h in hits) == paths
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(h.id == uri_id(h.uri) for h in hits)
    status = client.status()
    assert status.count == 4 and status.dim == 32 and status.model == "tiny-clip" and status.bytes_on_disk > 0

    # a second run skips what is unchanged, re-embeds what changed
    time.sleep(0.01)
    draw_picture(paths[0], "blue")
    again = client.index([str(root)])
    assert again.indexed == [paths[0]] and sorted(again.unchanged) == paths[1:]
    assert client.status().count == 4


def test_scores_are_the_cosine_of_the_encoders(served, picture_dir, tiny_model):
    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.clip_text_encoder import CLIPTextEncoder

    _, client = served
    root, paths = picture_dir
    client.clear()
    client.index(paths)
    images = DocList[ImageInput]([ImageInput(url=p) for p in paths])
    CLIPImageEncoder(pretrained_model_name_or_path=tiny_model).encode(images)
    query = DocList[TextQuery]([TextQuery(text="green square")])
    CLIPTextEncoder(pretrained_model_name_or_path=tiny_model).encode(query)
    expected = {d.url: float(np.dot(d.embedding, query[0].embedding)) for d in images}
    hits = client.search("green square", limit=2)
    assert len(hits) == 2
    best = sorted(expected.items(), key=lambda kv: -kv[1])[:2]
    assert [h.uri for h in hits] == [uri for uri, _ in best]
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.uri], abs=1e-5)


def test_failures_are_reported_per_document(served, picture_dir, tmp_path):
    _, client = served
    root, paths = picture_dir
    client.clear()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    report = client.index([paths[0], str(bad), str(tmp_path / "nowhere"), str(tmp_path / "*.webp")])
    assert report.indexed == [paths[0]]
    reasons = dict(report.failed)
    assert "not a recognised image format" in reasons[str(bad)]
    assert reasons[str(tmp_path / "nowhere")] == "no such file or directory"
    assert "matches no picture or video files" in reasons[str(tmp_path / "*.webp")]


def test_limit_min_score_filter_and_delete(served, picture_dir):
    _, client = served
    root, paths = picture_dir
    client.clear()
    client.index(paths[:2], tags={"album": "one"})
    client.index(paths[2:], tags={"album": "two"})
    assert len(client.search("red", limit=3)) == 3
    only_two = client.search("red", limit=10, filter={"album": "two"})
    assert sorted(h.uri for h in only_two) == paths[2:] and all(h.tags == {"album": "two"} for h in only_two)
    assert client.search("red", limit=10, min_score=1.01) == []
    with pytest.raises(ClipseekError, match="unknown operator"):
        client.search("red", filter={"album": {"$like": "t%"}})
    assert client.delete([uri_id(paths[0]), "no-such-id"]) == 1
    assert paths[0] not in {h.uri for h in client.search("red", limit=10)}


def test_empty_query_is_a_clear_error(served):
    _, client = served
    with pytest.raises(ClipseekError, match="empty query"):
        client.search("  ")
    with pytest.raises(TypeError, match="one text"):
        client.search(["a", "b"])


def test_documents_from_plain_docarray_types(served, picture_dir):
    """Any jina Client user can post docarray's own ImageDoc / TextDoc to the flows."""
    from docarray.documents import ImageDoc, TextDoc
    from jina import Client

    settings, client = served
    _, paths = picture_dir
    client.clear()
    Client(host=settings.index_address).post("/index", DocList[ImageDoc]([ImageDoc(url=p) for p in paths]),
                                             return_type=DocList[ImageDoc])
    answer = Client(host=settings.search_address).post("/search", DocList[TextDoc]([TextDoc(text="blue")]),
                                                       parameters={"limit": 2}, return_type=DocList[TextQuery])
    assert len(answer[0].matches) == 2 and {m.uri for m in answer[0].matches} <= set(paths)


def test_text_only_queries_skip_the_image_encoder(served, picture_dir):
    settings, client = served
    root, paths = picture_dir
    client.clear()
    client.index([str(root)])
    import clipseek.client as client_module

    def routed(query, target):
        answer = client._transport.request(settings.search_address, "/search", DocList[TextQuery]([query]),
                                           DocList[TextQuery], {"limit": 4}, target_executor=target)
        # jina lists every executor in the routes; one that was sent the request has the time its answer came
        ran = [r.executor for r in answer.routes if r.executor != "gateway" and r.end_time.ToNanoseconds() > 0]
        return ran, [(m.id, round(m.score, 6)) for m in answer.docs[0].matches]

    every_hop, expected = routed(TextQuery(text="a red circle"), None)
    assert every_hop == ["text_encoder", "image_encoder", "indexer"]
    shortened, got = routed(TextQuery(text="a red circle"), client_module.TEXT_ONLY_ROUTE)
    assert shortened == ["text_encoder", "indexer"] and got == expected and len(got) == 4
    # the client shortens text-only queries, and only those: an image query still reaches the image encoder
    assert [(h.id, round(h.score, 6)) for h in client.search("a red circle", limit=4)] == expected
    assert client.search(image=paths[0], limit=1)[0].uri == paths[0]


def test_client_closes_and_reopens_its_channels(served):
    settings, _ = served
    with ClipseekClient(settings.index_address, settings.search_address) as client:
        first = client.status().count
    assert client.status().count == first  # a request after close() opens a new channel


def test_flows_that_cannot_start_are_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=missing,
                        device="cpu", workspace=str(tmp_path / "ws"))
    with pytest.raises(RuntimeError, match="the flows did not start"):
        with flows_in_subprocess(settings, timeout=240):
            pass


def test_a_client_reaches_a_server_started_after_it_failed(tiny_model, tmp_path):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path / "ws"))
    client = ClipseekClient(settings.index_address, settings.search_address, timeout=30)
    for _ in range(3):  # a channel that failed a few times backs off; the client opens a fresh one
        with pytest.raises(ClipseekError, match="cannot reach"):
            client.status()
        assert settings.index_address not in client._transport._open  # the failed channel is not kept
    with flows_in_subprocess(settings):
        assert client.status().count == 0
        assert client.search("a red circle") == []


def test_unreachable_server_is_a_clear_error():
    port = free_port()
    client = ClipseekClient(f"grpc://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ClipseekError, match=f"127.0.0.1:{port}"):
        client.status()


def test_feedback_rounds_use_stored_vectors(served, picture_dir):
    _, client = served
    root, paths = picture_dir
    client.clear()
    client.index(paths)
    ids = [uri_id(p) for p in paths]
    # "more like this": liked results alone make the query; the liked picture is its own best match
    hits = client.search(like=[ids[2]], limit=4)
    assert hits[0].id == ids[2] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # a disliked result never comes back, and the ranking moves away from it
    refined = client.search("a red circle", like=[ids[2]], unlike=[ids[1]], limit=4)
    assert ids[1] not in [h.id for h in refined] and len(refined) == 3
    with pytest.raises(ClipseekError, match="not in the index"):
        client.search("a red circle", like=["nope"])
    with pytest.raises(ClipseekError, match="empty query"):
        client.search("")


def test_query_arithmetic_matches_the_weighted_sum(served, picture_dir, tiny_model):
    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.clip_text_encoder import CLIPTextEncoder

    _, client = served
    root, paths = picture_dir
    client.clear()
    client.index(paths)
    texts = DocList[TextQuery]([TextQuery(text=t) for t in ("a circle", "red", "green")])
    CLIPTextEncoder(pretrained_model_name_or_path=tiny_model).encode(texts)
    images = DocList[ImageInput]([ImageInput(url=p) for p in paths])
    CLIPImageEncoder(pretrained_model_name_or_path=tiny_model).encode(images)
    t = [np.asarray(d.embedding) for d in texts]
    q = t[0] + 1.0 * t[1] - 0.5 * t[2]
    q /= np.linalg.norm(q)
    expected = sorted(((float(np.dot(q, d.embedding)), d.url) for d in images), reverse=True)
    hits = client.search("a circle", plus=["red"], minus=["green"], limit=4)
    assert [h.uri for h in hits] == [u for _, u in expected]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-5)


@pytest.mark.cpu_kind  # a picture alone must embed as it did in a batch, in the precision auto takes here
def test_query_by_example(served, picture_dir, tmp_path):
    _, client = served
    root, paths = picture_dir
    client.clear()
    client.index(paths)
    for image in (paths[3], open(paths[3], "rb").read()):  # a path, or the bytes of the file
        hits = client.search(image=image, limit=4)
        assert hits[0].uri == paths[3] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ClipseekError, match="no such file"):
        client.search(image=str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ClipseekError, match="not a recognised image format"):
        client.search(image=str(bad))
    both = client.search("a red circle", image=paths[3], limit=4)  # text and image count together
    assert len(both) == 4


def test_classify_gives_probabilities_from_the_logit_scale(served, picture_dir, tiny_model):
    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.models.loading import load_clip
    from executors.clip_text_encoder import CLIPTextEncoder

    _, client = served
    _, paths = picture_dir
    labels = ["red circle", "blue square", "car"]
    result = client.classify(paths[0], labels, template="a drawing of a {}")
    assert sorted(label for label, _ in result) == sorted(labels)
    assert sum(p for _, p in result) == pytest.approx(1.0, abs=1e-5)
    assert [p for _, p in result] == sorted((p for _, p in result), reverse=True)
    # the same numbers from the encoders and the model's own logit scale
    texts = DocList[TextQuery]([TextQuery(text=f"a drawing of a {label}") for label in labels])
    CLIPTextEncoder(pretrained_model_name_or_path=tiny_model).encode(texts)
    image = DocList[ImageInput]([ImageInput(url=paths[0])])
    CLIPImageEncoder(pretrained_model_name_or_path=tiny_model).encode(image)
    scale = float(load_clip(tiny_model, "cpu", "float32").model.logit_scale.exp())
    logits = scale * np.stack([d.embedding for d in texts]) @ image[0].embedding
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert dict(result) == pytest.approx(dict(zip(labels, probs.tolist())), abs=1e-4)
    with pytest.raises(ClipseekError, match="at least one label"):
        client.classify(paths[0], [" "])
    with pytest.raises(ClipseekError, match="template"):
        client.classify(paths[0], ["x"], template="no placeholder")
