"""Kubernetes and docker compose manifests of both flows, written offline by jina's exporter: one process
per indexer shard, on a volume of its own, reached by both flows (flows/export.py, flows/cluster.py)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTORS = ("clip_image_encoder", "clip_text_encoder", "simple_indexer", "shard_merger", "read_only_gateway")
WORKLOADS = ("Deployment", "StatefulSet")


def _run(args):
    env = {**os.environ, "JINA_GATEWAY_IMAGE": "jinaai/jina:3.34.0-py310-standard"}
    return subprocess.run([sys.executable, "-m", "clipseek.cli", "export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _manifests(root):
    """{(namespace, kind, name): document} of every file under ``root``, and the files."""
    found, files = {}, []
    for dirpath, _, names in os.walk(root):
        for name in names:
            files.append(os.path.join(dirpath, name))
            for doc in _docs(files[-1]):
                key = (doc["metadata"].get("namespace"), doc["kind"], doc["metadata"]["name"])
                assert key not in found, key
                found[key] = doc
    return found, sorted(files)


def _args(container):
    """A jina container's ``--flag value`` arguments as a dict."""
    args, out = container["args"], {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            out[arg] = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
    return out


def _executor(doc):
    (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] in ("executor", "gateway")]
    return container


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    out = tmp_path_factory.mktemp("k8s")
    run = _run(["kubernetes", str(out), "--image-prefix", "registry.local/clipseek", "--tag", "9.9", "--shards", "2"])
    assert run.returncode == 0, run.stderr
    assert "WARN" not in run.stdout + run.stderr
    manifests, files = _manifests(out)
    return out, manifests, files


def test_kubernetes_manifests_pass_strict_validation(k8s):
    out, _, files = k8s
    validator = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    assert os.path.exists(validator), "kubernetes-validate is missing: pip install -r requirements.lock"
    run = subprocess.run([validator, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "failed" not in run.stdout.lower() + run.stderr.lower()


def test_kubernetes_manifests(k8s):
    out, manifests, _ = k8s
    images = {c["image"] for doc in manifests.values() if doc["kind"] in WORKLOADS
              for c in doc["spec"]["template"]["spec"]["containers"]}
    for executor in EXECUTORS:
        assert f"registry.local/clipseek/{executor}:9.9" in images, images
    assert {n for (_, kind, n) in manifests if kind == "Namespace"} == {"clipseek-index", "clipseek-search"}
    assert sorted(os.listdir(out / "index" / "indexer")) == ["indexer-0.yml", "indexer-1.yml", "indexer-head.yml"]
    assert sorted(os.listdir(out / "search" / "indexer")) == ["indexer.yml"]  # the merger; no shard of its own
    for (namespace, kind, name), doc in manifests.items():
        if kind in WORKLOADS and namespace == "clipseek-search":
            assert "simple_indexer" not in _executor(doc)["image"], name


def test_every_index_shard_keeps_its_files_on_its_own_claim(k8s):
    _, manifests, _ = k8s
    stateful = {name: doc for (ns, kind, name), doc in manifests.items() if kind == "StatefulSet"}
    assert sorted(stateful) == ["indexer-0", "indexer-1"]
    claims = set()
    for k, name in enumerate(sorted(stateful)):
        doc = stateful[name]
        assert doc["metadata"]["namespace"] == "clipseek-index" and doc["spec"]["replicas"] == 1
        assert doc["spec"]["serviceName"] == name
        container = _executor(doc)
        args = _args(container)
        assert container["image"] == "registry.local/clipseek/simple_indexer:9.9"
        assert args["--workspace"] == "/workspace" and args["--shards"] == "2"
        assert args.get("--shard-id", "0") == str(k)  # its files: /workspace/SimpleIndexer/<k>
        (template,) = doc["spec"]["volumeClaimTemplates"]
        assert template["spec"]["accessModes"] == ["ReadWriteOnce"]  # one node's disk: SQLite WAL needs it
        assert template["spec"]["resources"]["requests"]["storage"]
        assert container["volumeMounts"] == [{"name": template["metadata"]["name"], "mountPath": "/workspace"}]
        claims.add(template["metadata"]["name"])
    assert len(claims) == 2
    # nothing else mounts a volume or runs the indexer: one process per shard, the only one on its files
    for (ns, kind, name), doc in manifests.items():
        if kind == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            assert "volumes" not in pod and all("volumeMounts" not in c for c in pod["containers"]), name
            assert all("simple_indexer" not in c["image"] for c in pod["containers"]), name
        assert kind != "PersistentVolumeClaim"


def test_the_search_flows_shard_k_is_the_index_flows_shard_k(k8s):
    _, manifests, _ = k8s
    gateway = _args(_executor(manifests[("clipseek-search", "Deployment", "gateway")]))
    assert _executor(manifests[("clipseek-search", "Deployment", "gateway")])["image"] == \
        "registry.local/clipseek/read_only_gateway:9.9"  # refuses /index, /update, /delete, /clear
    addresses = json.loads(gateway["--deployments-addresses"])
    graph = json.loads(gateway["--graph-description"])
    head = _args(_executor(manifests[("clipseek-index", "Deployment", "indexer-head")]))
    index_shards = json.loads(head["--connection-list"])
    for k in range(2):
        service_host = f"indexer-{k}.clipseek-index.svc"
        assert addresses[f"indexer_{k}"] == [f"grpc://{service_host}:8080"]
        assert index_shards[str(k)] == f"{service_host}:8080"  # the index flow's head reaches the same service
        service = manifests[("clipseek-index", "Service", f"indexer-{k}")]
        (port,) = service["spec"]["ports"]
        assert port["port"] == port["targetPort"] == 8080
        pods = manifests[("clipseek-index", "StatefulSet", f"indexer-{k}")]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pods.items()  # the service is that StatefulSet's pod
        assert graph["image_encoder"] == ["indexer_0", "indexer_1"] and graph[f"indexer_{k}"] == ["indexer"]
    # the search flow's own merger gets both shards' answers side by side and keeps the global top-k
    assert json.loads(gateway["--deployments-no-reduce"]) == ["indexer"]
    assert addresses["indexer"] == ["grpc://indexer.clipseek-search.svc:8080"]
    merger = manifests[("clipseek-search", "Deployment", "indexer")]
    assert _executor(merger)["image"] == "registry.local/clipseek/shard_merger:9.9"
    assert json.loads(_args(_executor(merger))["--uses-with"]) == {"limit": 10, "shards": 2}  # needs both


def test_encoders_are_stateless_deployments_scaled_by_replicas(k8s):
    _, manifests, _ = k8s
    encoders = {(ns, name): doc for (ns, kind, name), doc in manifests.items() if "encoder" in name and kind in WORKLOADS}
    assert sorted(encoders) == [("clipseek-index", "image-encoder"), ("clipseek-search", "image-encoder"),
                                ("clipseek-search", "text-encoder")]
    for doc in encoders.values():
        assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] == 1  # the flow YAMLs' replicas
        assert doc["spec"]["template"]["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"


def test_an_earlier_export_or_a_shared_volume_is_refused(tmp_path, monkeypatch):
    from flows.export import export

    monkeypatch.setenv("JINA_GATEWAY_IMAGE", "jinaai/jina:3.34.0-py310-standard")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "old.yml").write_text("kind: Deployment\n")
    with pytest.raises(ValueError, match="is not empty"):
        export("kubernetes", str(tmp_path))
    monkeypatch.setenv("JINA_K8S_ACCESS_MODES", '["ReadWriteMany"]')
    with pytest.raises(ValueError, match="needs a ReadWriteOnce volume"):
        export("kubernetes", str(tmp_path / "new"))


def test_docker_compose_files(tmp_path):
    out = _run(["docker-compose", str(tmp_path), "--shards", "2"])
    assert out.returncode == 0, out.stderr
    index = _docs(tmp_path / "docker-compose.index.yml")[0]
    search = _docs(tmp_path / "docker-compose.search.yml")[0]
    assert (index["name"], search["name"]) == ("clipseek-index", "clipseek-search")  # two projects, no clash
    assert index["networks"]["clipseek-shards"]["name"] == "clipseek-shards"
    assert search["networks"]["clipseek-shards"] == {"name": "clipseek-shards", "external": True}
    for k in range(2):
        shard = index["services"][f"indexer-{k}"]
        assert shard["image"] == "clipseek/simple_indexer:0.1.0"
        assert shard["volumes"] == [f"indexer-{k}-workspace:/workspace"]
        assert "clipseek-shards" in shard["networks"]
        assert f"indexer-{k}-workspace" in index["volumes"]
    for compose in (index, search):
        for name, service in compose["services"].items():
            if not name.startswith("indexer-") or name in ("indexer-head", "indexer-uses-after"):
                assert "volumes" not in service, name  # nothing hides the image's /app
    gateway = search["services"]["gateway"]
    assert gateway["image"] == "clipseek/read_only_gateway:0.1.0" and "clipseek-shards" in gateway["networks"]
    command = gateway["command"]
    addresses = json.loads(command[command.index("--deployments-addresses") + 1])
    assert addresses["indexer_0"] == ["grpc://indexer-0:8081"] and addresses["indexer_1"] == ["grpc://indexer-1:8081"]
    assert "simple_indexer" not in {s["image"].split("/")[-1].split(":")[0] for s in search["services"].values()}
    assert any("51000" in str(p) for p in index["services"]["gateway"]["ports"])
    assert any("51001" in str(p) for p in gateway["ports"])


def _validate(files):
    validator = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    run = subprocess.run([validator, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_index_flows_merger_needs_every_shard(k8s):
    _, manifests, _ = k8s
    head = manifests[("clipseek-index", "Deployment", "indexer-head")]
    (merger,) = [c for c in head["spec"]["template"]["spec"]["containers"] if c["name"] == "uses-after"]
    assert merger["image"] == "registry.local/clipseek/shard_merger:9.9" and _args(merger)["--shards"] == "2"


def test_encoders_read_the_model_from_a_claim_mounted_read_only(tmp_path):
    run = _run(["kubernetes", str(tmp_path), "--shards", "2", "--model-volume", "clip-models",
                "--model", "clip-vit-base-patch32"])
    assert run.returncode == 0, run.stderr
    manifests, files = _manifests(tmp_path)
    _validate(files)
    encoders = {(ns, name): doc for (ns, kind, name), doc in manifests.items()
                if kind == "Deployment" and "encoder" in name}
    assert sorted(encoders) == [("clipseek-index", "image-encoder"), ("clipseek-search", "image-encoder"),
                                ("clipseek-search", "text-encoder")]  # both encoders, both flows
    for doc in encoders.values():
        pod = doc["spec"]["template"]["spec"]
        assert pod["volumes"] == [{"name": "model", "persistentVolumeClaim": {"claimName": "clip-models",
                                                                              "readOnly": True}}]
        container = _executor(doc)
        assert container["volumeMounts"] == [{"name": "model", "mountPath": "/models", "readOnly": True}]
        uses_with = json.loads(_args(container)["--uses-with"])
        assert uses_with["pretrained_model_name_or_path"] == "/models/clip-vit-base-patch32"
    for (ns, kind, name), doc in manifests.items():  # nothing else mounts it, and no claim is made for it
        if kind in WORKLOADS and "encoder" not in name:
            assert "model" not in {v["name"] for v in doc["spec"]["template"]["spec"].get("volumes", [])}, name
        assert kind != "PersistentVolumeClaim"
    # a folder inside the image, as before: no volume
    baked = _run(["kubernetes", str(tmp_path / "baked"), "--model", "/app/data/models/clipseek-demo"])
    assert baked.returncode == 0, baked.stderr
    manifests, _ = _manifests(tmp_path / "baked")
    for (ns, kind, name), doc in manifests.items():
        if kind == "Deployment" and "encoder" in name:
            assert "volumes" not in doc["spec"]["template"]["spec"]
            assert json.loads(_args(_executor(doc))["--uses-with"])["pretrained_model_name_or_path"] == \
                "/app/data/models/clipseek-demo"
    for bad, why in ((["--model-volume", "Clip_Models"], "PersistentVolumeClaim"),
                     (["--model-volume", "clip", "--model", "../x"], "folder inside the volume")):
        refused = _run(["kubernetes", str(tmp_path / "bad"), *bad])
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr


def test_compose_encoders_read_the_model_from_a_volume(tmp_path):
    for volume, declared in (("clip-models", {"clip-models": {"external": True}}), ("/srv/models", {})):
        out = tmp_path / volume.strip("/").replace("/", "-")
        run = _run(["docker-compose", str(out), "--shards", "2", "--model-volume", volume, "--model", "clip"])
        assert run.returncode == 0, run.stderr
        for flow, encoders in (("index", ["image-encoder"]), ("search", ["image-encoder", "text-encoder"])):
            compose = _docs(out / f"docker-compose.{flow}.yml")[0]
            for name, service in compose["services"].items():
                command = service["command"]
                if name in encoders:
                    assert service["volumes"] == [f"{volume}:/models:ro"], name
                    uses_with = json.loads(command[command.index("--uses-with") + 1])
                    assert uses_with["pretrained_model_name_or_path"] == "/models/clip"
                else:
                    assert f"{volume}:/models:ro" not in service.get("volumes", []), name
            named = {k: v for k, v in (compose.get("volumes") or {}).items() if not k.endswith("-workspace")}
            assert named == declared  # a named volume made beforehand (docker volume create), never a new one
