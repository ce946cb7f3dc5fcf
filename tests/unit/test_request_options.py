"""A request's parameters may set only what each executor declares; the model, device, precision and every
safety limit stay as the server was started, and a request naming one is refused by name."""

import numpy as np
import pytest
from docarray import DocList
from PIL import Image

from executors.clip_image_encoder import CLIPImageEncoder
from executors.clip_text_encoder import CLIPTextEncoder
from executors.docs import ImageInput, KeyDoc, TextQuery
from executors.params import SERVER_OPTIONS, RequestError, request_options
from executors.simple_indexer import SimpleIndexer


@pytest.fixture(scope="module")
def image_encoder(tiny_model):
    return CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, device="cpu", dtype="float32", batch_size=4,
                            max_megapixels=1)


@pytest.fixture
def big_png(tmp_path):
    path = tmp_path / "three-megapixels.png"
    Image.new("RGB", (2000, 1500), (200, 40, 40)).save(path)
    return str(path)


@pytest.mark.parametrize("name,value", [("max_megapixels", 1000), ("pretrained_model_name_or_path", "openai/clip-vit-large-patch14"),
                                        ("device", "cuda"), ("dtype", "float32"), ("url_timeout", 3600),
                                        ("max_download_bytes", 2**40), ("allowed_roots", ["/"]),
                                        ("allow_private_urls", True)])
def test_a_request_cannot_set_what_the_server_fixes(image_encoder, big_png, name, value):
    docs = DocList[ImageInput]([ImageInput(url=big_png)])
    with pytest.raises(RequestError, match=rf"parameter '{name}' is fixed when the server starts \({SERVER_OPTIONS[name]}\)"):
        image_encoder.encode(docs, parameters={name: value})
    assert docs[0].embedding is None


def test_the_megapixel_limit_holds_whatever_the_request_says(image_encoder, big_png):
    docs = DocList[ImageInput]([ImageInput(url=big_png)])
    image_encoder.encode(docs)
    assert docs[0].embedding is None and "over the limit of 1" in docs[0].error


def test_batch_size_may_be_lowered_not_raised(image_encoder, picture_dir, monkeypatch):
    _, paths = picture_dir
    docs = DocList[ImageInput]([ImageInput(url=p) for p in paths])
    image_encoder.encode(docs, parameters={"batch_size": 2})
    assert all(d.embedding is not None for d in docs)
    with pytest.raises(RequestError, match=r"'batch_size': must be an integer from 1 to 4, got 1000"):
        image_encoder.encode(DocList[ImageInput]([ImageInput(url=paths[0])]), parameters={"batch_size": 1000})


def test_the_text_encoder_keeps_its_model_and_bounds(tiny_model):
    encoder = CLIPTextEncoder(pretrained_model_name_or_path=tiny_model, device="cpu", dtype="float32")
    for parameters, pattern in (({"pretrained_model_name_or_path": "gpt2"}, "clipseek serve --model"),
                                ({"dtype": "bfloat16"}, "clipseek serve --dtype"),
                                ({"max_length": 10_000}, "'max_length': must be an integer from 1 to 77"),
                                ({"template": "x" * 5000}, "'template': must be a string of at most 1000")):
        with pytest.raises(RequestError, match=pattern):
            encoder.encode(DocList[TextQuery]([TextQuery(text="red")]), parameters=parameters)
    docs = DocList[TextQuery]([TextQuery(text="red")])
    encoder.encode(docs, parameters={"max_length": 5, "limit": 3})  # a lower bound is fine; others' names ignored
    assert docs[0].embedding is not None


def _indexer(tmp_path, **kwargs):
    return SimpleIndexer(index_dir=str(tmp_path / "index"), **kwargs)


def test_indexer_request_bounds(tmp_path):
    indexer = _indexer(tmp_path)
    query = DocList[TextQuery]([TextQuery(text="x", embedding=np.ones(4, dtype=np.float32))])
    for parameters, pattern in (({"limit": 10**9}, "'limit': must be an integer from 1 to 10000"),
                                ({"limit": -1}, "'limit'"), ({"min_score": float("nan")}, "'min_score'"),
                                ({"query_weight": 1e300}, "'query_weight'"), ({"storage_dtype": "float16"}, "storage_dtype"),
                                ({"index_dir": "/tmp/elsewhere"}, "index_dir"), ({"read_only": False}, "read_only")):
        with pytest.raises(RequestError, match=pattern):
            indexer.search(query, parameters=parameters)
    for threshold in (0, 1.5, -1, float("nan")):
        with pytest.raises(RequestError, match="'threshold'"):
            indexer.duplicates(DocList[KeyDoc](), parameters={"threshold": threshold})
    with pytest.raises(RequestError, match="ids must be a list of document ids"):
        indexer.delete(DocList[KeyDoc](), parameters={"ids": {"$gt": ""}})
    indexer.close()


def test_a_read_only_indexer_never_writes_nor_locks(tmp_path):
    writer = _indexer(tmp_path)
    vector = np.ones(4, dtype=np.float32)
    writer.index(DocList[ImageInput]([ImageInput(id="a", uri="/a.png", embedding=vector)]))
    reader = _indexer(tmp_path, read_only=True)
    for endpoint, call in (("/index", lambda: reader.index(DocList[ImageInput]([ImageInput(id="b", embedding=vector)]))),
                           ("/delete", lambda: reader.delete(DocList[KeyDoc]([KeyDoc(id="a")]))),
                           ("/clear", lambda: reader.clear())):
        with pytest.raises(RequestError, match=rf"{endpoint} is refused here: this flow reads the index"):
            call()
    assert reader.store._lock_fd is None  # never took the writer lock
    writer.index(DocList[ImageInput]([ImageInput(id="b", uri="/b.png", embedding=-vector)]))  # the writer still writes
    hits = reader.search(DocList[TextQuery]([TextQuery(text="x", embedding=-vector)]))[0].matches
    assert [h.id for h in hits] == ["b", "a"]  # and the reader sees its commits
    reader.close()
    writer.close()


def test_request_options_ignore_names_of_other_executors():
    assert request_options({"limit": 10}, {"template": "a {}", "limit": 3.0}, {"limit": lambda v, d: int(v)}) == {"limit": 3}


@pytest.mark.parametrize("threshold", ["1.5", "0", "0.2", "-1", "nan", "x"])
def test_duplicates_threshold_out_of_range_is_a_usage_error(threshold, capsys):
    from clipseek.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["duplicates", "--threshold", threshold])
    assert exit_info.value.code == 2 and "--threshold: must be" in capsys.readouterr().err
    assert build_parser().parse_args(["duplicates", "--threshold", "0.97"]).threshold == 0.97
