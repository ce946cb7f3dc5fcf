"""A plain jina Client, not clipseek's, tries to widen the server's limits and to write through the search flow."""

import os
import re
import shutil

import pytest
from docarray import DocList
from docarray.documents import ImageDoc, TextDoc
from jina import Client
from PIL import Image

from clipseek.client import ClipseekClient, ClipseekError
from executors.docs import IndexStatus, KeyDoc, TextQuery
from flows.serving import flows_in_subprocess, free_port
from flows.settings import Settings


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("workspace")), max_megapixels=1)
    with flows_in_subprocess(settings):
        yield settings, ClipseekClient(settings.index_address, settings.search_address, timeout=120)


def _error(call) -> str:
    """What a plain jina Client gets back from a refused request (it raises, or answers docs with errors)."""
    try:
        answer = call()
    except Exception as e:  # noqa: BLE001 - whichever way jina reports the executor's refusal
        return re.sub(r"\\+", "", str(e))  # jina quotes the executor's error inside a status message
    raise AssertionError(f"the request was answered: {answer!r}")


def test_request_parameters_cannot_widen_the_megapixel_limit(served, tmp_path):
    settings, client = served
    big = tmp_path / "three-megapixels.png"
    Image.new("RGB", (2000, 1500), (30, 200, 40)).save(big)
    jina_client = Client(host=settings.index_address)
    before = client.status().count
    message = _error(lambda: jina_client.post("/index", DocList[ImageDoc]([ImageDoc(url=str(big))]),
                                              parameters={"max_megapixels": 1000}, return_type=DocList[ImageDoc]))
    assert "'max_megapixels' is fixed when the server starts (clipseek serve --max-megapixels)" in message
    for name, value in (("pretrained_model_name_or_path", "openai/clip-vit-large-patch14"), ("dtype", "float32"),
                        ("max_download_bytes", 2**40), ("image_encoder__max_megapixels", 1000)):
        message = _error(lambda: jina_client.post("/index", DocList[ImageDoc]([ImageDoc(url=str(big))]),
                                                  parameters={name: value}, return_type=DocList[ImageDoc]))
        assert "is fixed when the server starts" in message, (name, message)
    report = client.index([str(big)])  # and without the parameter the server's own limit refuses it
    assert not report.indexed and "over the limit of 1" in report.failed[0][1]
    assert client.status().count == before


def test_the_search_flow_refuses_writes_and_never_locks_the_index(served, picture_dir):
    settings, client = served
    _, paths = picture_dir
    search_port = Client(host=settings.search_address)
    for endpoint, docs, kind in (("/index", DocList[ImageDoc]([ImageDoc(url=paths[0])]), DocList[ImageDoc]),
                                 ("/delete", DocList[KeyDoc]([KeyDoc(id="x")]), DocList[KeyDoc]),
                                 ("/clear", DocList[TextDoc](), DocList[IndexStatus])):
        message = _error(lambda: search_port.post(endpoint, docs, return_type=kind))
        assert f"{endpoint} is refused here: this flow reads the index" in message, message
    report = client.index(paths)  # the index flow still holds the writer lock and writes
    assert sorted(report.indexed) == sorted(paths), report.failed
    hits = search_port.post("/search", DocList[TextDoc]([TextDoc(text="a red circle")]), parameters={"limit": 4},
                            return_type=DocList[TextQuery])[0].matches
    assert len(hits) == 4
    with pytest.raises(ClipseekError, match="'limit': must be an integer from 1 to 10000"):
        client.search("a red circle", limit=10**9)


def test_one_entry_per_picture_whatever_the_path_or_the_client(served, picture_dir, tmp_path):
    settings, client = served
    root, paths = picture_dir
    client.clear()
    os.symlink(root, root / "sub" / "loop")  # pictures/sub/loop -> pictures: a loop for a ** glob
    os.symlink(paths[0], tmp_path / "alias.png")
    report = client.index([str(root / "**" / "*.*"), str(tmp_path / "alias.png")])
    assert sorted(report.indexed) == sorted(os.path.realpath(p) for p in paths), report.failed
    assert client.status().count == len(paths)
    # a plain jina Client posts a file with an id of its own; clipseek index of the same file replaces it
    picture = str(tmp_path / "posted.png")
    shutil.copy(paths[1], picture)
    Client(host=settings.index_address).post("/index", DocList[ImageDoc]([ImageDoc(url=picture)]),
                                             return_type=DocList[ImageDoc])
    assert client.status().count == len(paths) + 1
    assert client.index([picture], force=True).indexed == [picture]
    assert client.status().count == len(paths) + 1
    assert [d.uri for d in client.documents()].count(picture) == 1
