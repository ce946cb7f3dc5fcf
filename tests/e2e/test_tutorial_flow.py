"""The tutorial style: Flow.load_config on the YAML files, post in-process; and persistence across restarts.

The tutorial runs as a user's script would, in a Python process of its own: jina forks the
executors from the process that enters the flow, and the test process runs threads of its own.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TUTORIAL = textwrap.dedent('''
    import json, os, sys
    from docarray import DocList
    from jina import Flow
    from executors.docs import ImageInput, TextQuery
    from flows.serving import free_port

    workspace, paths = sys.argv[1], sys.argv[2:]

    def flow(name):
        f = Flow.load_config(name)
        f.port = free_port()
        f.workspace = workspace
        return f

    with flow("flow_index.yml") as f:
        indexed = f.post("/index", DocList[ImageInput]([ImageInput(url=p) for p in paths]), return_type=DocList[ImageInput])
    stored = os.path.exists(os.path.join(workspace, "SimpleIndexer", "0", "vectors.f32"))
    # a new process tree over the same workspace sees everything that was committed
    with flow("flow_search.yml") as f:
        answer = f.post("/search", DocList[TextQuery]([TextQuery(text="a red circle")]), parameters={"limit": 10},
                        return_type=DocList[TextQuery])
    print(json.dumps({"status": [d.status for d in indexed], "stored": stored,
                      "matches": [m.uri for m in answer[0].matches]}))
''')


def test_load_config_post_and_restart(tiny_model, picture_dir, tmp_path):
    workspace = str(tmp_path / "ws")
    _, paths = picture_dir
    env = {k: v for k, v in os.environ.items() if k != "CLIPSEEK_WORKSPACE"}
    env.update(CLIPSEEK_MODEL=tiny_model, PYTHONPATH=ROOT)  # the encoders' default model
    out = subprocess.run([sys.executable, "-c", TUTORIAL, workspace, *paths], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == ["indexed"] * len(paths)
    assert result["stored"]
    assert sorted(result["matches"]) == paths
