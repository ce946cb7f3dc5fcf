"""The tutorial style: Flow.load_config on the YAML files, post in-process; and persistence across restarts."""

import os

from docarray import DocList
from jina import Flow

from executors.docs import ImageInput, TextQuery
from flows.serving import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flow(name: str, workspace: str) -> Flow:
    flow = Flow.load_config(os.path.join(ROOT, name))
    flow.port = free_port()
    flow.workspace = workspace
    return flow


def test_load_config_post_and_restart(tiny_model, picture_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEEK_MODEL", tiny_model)  # the encoders' default model
    monkeypatch.delenv("CLIPSEEK_WORKSPACE", raising=False)
    workspace = str(tmp_path / "ws")
    _, paths = picture_dir
    with _flow("flow_index.yml", workspace) as flow:
        indexed = flow.post("/index", DocList[ImageInput]([ImageInput(url=p) for p in paths]),
                            return_type=DocList[ImageInput])
        assert [d.status for d in indexed] == ["indexed"] * len(paths)
    assert os.path.exists(os.path.join(workspace, "SimpleIndexer", "0", "vectors.f32"))
    # a new process tree over the same workspace sees everything that was committed
    with _flow("flow_search.yml", workspace) as flow:
        answer = flow.post("/search", DocList[TextQuery]([TextQuery(text="a red circle")]),
                           parameters={"limit": 10}, return_type=DocList[TextQuery])
    assert sorted(m.uri for m in answer[0].matches) == paths
