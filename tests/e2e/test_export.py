"""Kubernetes and docker compose manifests of both flows, written offline by jina's exporter."""

import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args):
    env = {**os.environ, "JINA_GATEWAY_IMAGE": "jinaai/jina:3.34.0-py310-standard"}
    return subprocess.run([sys.executable, "-m", "clipseek.cli", "export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def _docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def test_kubernetes_manifests(tmp_path):
    out = _run(["kubernetes", str(tmp_path), "--image-prefix", "registry.local/clipseek", "--tag", "9.9", "--shards", "2"])
    assert out.returncode == 0, out.stderr
    images = set()
    for flow in ("index", "search"):
        root = tmp_path / flow
        assert (root / "gateway").is_dir()
        for dirpath, _, files in os.walk(root):
            for name in files:
                for doc in _docs(os.path.join(dirpath, name)):
                    if doc.get("kind") in ("Deployment", "StatefulSet"):
                        for c in doc["spec"]["template"]["spec"]["containers"]:
                            images.add(c["image"])
    for executor in ("clip_image_encoder", "clip_text_encoder", "simple_indexer", "shard_merger"):
        assert f"registry.local/clipseek/{executor}:9.9" in images, images
    shard_files = sorted(os.listdir(tmp_path / "index" / "indexer"))
    assert shard_files == ["indexer-0.yml", "indexer-1.yml", "indexer-head.yml"]  # one per shard and their head


def test_docker_compose_files(tmp_path):
    out = _run(["docker-compose", str(tmp_path)])
    assert out.returncode == 0, out.stderr
    for flow in ("index", "search"):
        compose = _docs(tmp_path / f"docker-compose.{flow}.yml")[0]
        images = {s["image"] for s in compose["services"].values()}
        assert any(i.startswith("clipseek/simple_indexer:") for i in images)
        assert any(i.startswith("clipseek/clip_") for i in images)
        gateway = next(s for name, s in compose["services"].items() if name == "gateway")
        assert any("51000" in str(p) or "51001" in str(p) for p in gateway.get("ports", []))
