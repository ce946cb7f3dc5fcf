"""Manifests for running both flows on Kubernetes or docker compose, from the same flow YAMLs.

Every executor runs from an image built by the project's ``Dockerfile`` (one tag per executor:
``docker build --build-arg EXECUTOR=clip_image_encoder -t PREFIX/clip_image_encoder:TAG .``);
jina's own exporter writes the manifests.
"""

import os
from typing import Dict, List, Optional

from flows.serving import INDEX_FLOW, SEARCH_FLOW, flow_config
from flows.settings import DEFAULT_INDEX_PORT, DEFAULT_SEARCH_PORT

GATEWAY_IMAGE = "jinaai/jina:3.34.0-py310-standard"
CONTAINER_WORKSPACE = "/workspace"


def image_name(uses: str, prefix: str, tag: str) -> str:
    executor = os.path.splitext(os.path.basename(uses))[0]
    return f"docker://{prefix}/{executor}:{tag}"


def container_config(path: str, port: int, prefix: str, tag: str, shards: Optional[int],
                     encoder_options: Dict) -> Dict:
    """The flow YAML with every executor (and shard merger) taken from a container image."""
    config = flow_config(path, host="0.0.0.0", port=port, workspace=CONTAINER_WORKSPACE,
                         encoder_options=encoder_options, shards=shards)
    for executor in config["executors"]:
        executor.pop("host", None)  # inside a cluster every pod listens on its own address
        executor["workspace"] = CONTAINER_WORKSPACE
        for key in ("uses", "uses_after"):
            if key in executor:
                executor[key] = image_name(executor[key], prefix, tag)
    return config


def export(kind: str, out_dir: str, *, prefix: str = "clipseek", tag: str = "0.1.0", shards: Optional[int] = None,
           model: Optional[str] = None, namespace: str = "clipseek") -> List[str]:
    """Write Kubernetes manifests (one folder per flow) or docker compose files; returns what was written."""
    from jina import Flow

    os.environ.setdefault("JINA_GATEWAY_IMAGE", GATEWAY_IMAGE)  # else jina asks the hub which image to use
    options = {"pretrained_model_name_or_path": model}
    written = []
    os.makedirs(out_dir, exist_ok=True)
    for name, path, port in (("index", INDEX_FLOW, DEFAULT_INDEX_PORT), ("search", SEARCH_FLOW, DEFAULT_SEARCH_PORT)):
        flow = Flow.load_config(container_config(path, port, prefix, tag, shards, options))
        if kind == "kubernetes":
            target = os.path.join(out_dir, name)
            flow.to_kubernetes_yaml(target, k8s_namespace=f"{namespace}-{name}")
        elif kind == "docker-compose":
            target = os.path.join(out_dir, f"docker-compose.{name}.yml")
            flow.to_docker_compose_yaml(target, network_name=f"{namespace}-{name}")
        else:
            raise ValueError(f"unknown export kind {kind!r}: kubernetes or docker-compose")
        written.append(target)
    return written
