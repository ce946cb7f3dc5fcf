"""Manifests for running both flows on Kubernetes or docker compose, from the same flow YAMLs.

Every executor runs from an image built by the project's ``Dockerfile`` (one tag per executor:
``docker build --build-arg EXECUTOR=clip_image_encoder -t PREFIX/clip_image_encoder:TAG .``);
jina's own exporter writes the manifests, in the topology of ``flows/cluster.py``:

- the index flow's indexer is jina's sharded executor; each shard is one process that keeps its
  files on a volume of its own: on Kubernetes a StatefulSet of one pod with a ReadWriteOnce
  PersistentVolumeClaim mounted at the workspace, in docker compose a named volume;
- the search flow reaches those same processes as external executors (on Kubernetes the shard's
  Service in the index namespace, port 8080), merges their answers with its own ``ShardMerger``
  and refuses writes at its gateway (``ReadOnlyGateway``, image ``read_only_gateway``);
- the encoders are stateless Deployments whose ``replicas`` (the flow YAMLs) scale embedding; they load
  the model from the hub, from a folder inside their image, or (``model_volume``) from a volume of
  the cluster mounted read-only at ``/models`` in each of them.
"""

import contextlib
import copy
import json
import os
import posixpath
import re
from typing import Dict, List, Optional, Sequence

import yaml

from flows.cluster import INDEXER, indexer_of, shard_count, shard_names, shared_search_config
from flows.serving import INDEX_FLOW, SEARCH_FLOW, flow_config, skip_empty_argument_check
from flows.settings import DEFAULT_INDEX_PORT, DEFAULT_SEARCH_PORT, PROJECT_ROOT

GATEWAY_IMAGE = "jinaai/jina:3.34.0-py310-standard"
CONTAINER_WORKSPACE = "/workspace"
K8S_PORT = 8080  # every executor and head listens here inside the cluster
COMPOSE_PORT = 8081  # and here in docker compose
# An index must sit on a disk of one node: its SQLite runs in WAL mode, which network file systems break.
ACCESS_MODES = ["ReadWriteOnce"]
DEFAULT_STORAGE = "10Gi"
READ_ONLY_GATEWAY_YML = os.path.join(PROJECT_ROOT, "executors", "read_only_gateway.yml")
# Where every encoder finds the volume it reads the model from (--model-volume), mounted read-only.
MODEL_MOUNT = "/models"
MODEL_VOLUME = "model"  # the pod's name for it
CLAIM_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a Kubernetes object name (DNS subdomain)
COMPOSE_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")


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


def model_path(model: Optional[str], volume: Optional[str]) -> Optional[str]:
    """What the encoders load (``pretrained_model_name_or_path``): without ``volume``, ``model`` as given (a hub
    name, or a folder inside the image); with it, the folder ``model`` of that volume, mounted at ``MODEL_MOUNT``
    (the volume's root without ``model``)."""
    if not volume:
        return model
    if model and (os.path.isabs(model) or ".." in model.replace("\\", "/").split("/")):
        raise ValueError(f"--model {model}: with --model-volume, name the model's folder inside the volume "
                         f"(e.g. clip-vit-base-patch32), which the encoders read at {MODEL_MOUNT}/<folder>")
    return posixpath.join(MODEL_MOUNT, model.strip("/")) if model else MODEL_MOUNT


def _check_model_volume(kind: str, volume: str) -> None:
    if kind == "kubernetes" and not CLAIM_NAME.fullmatch(volume):
        raise ValueError(f"--model-volume {volume!r}: on Kubernetes, the name of an existing PersistentVolumeClaim "
                         f"(lower-case letters, digits, '-' and '.') in each flow's namespace")
    if kind == "docker-compose" and not (_is_host_path(volume) or COMPOSE_VOLUME_NAME.fullmatch(volume)):
        raise ValueError(f"--model-volume {volume!r}: in docker compose, a named volume (letters, digits, '_', "
                         f"'.', '-') or a host folder (/abs/path or ./relative/path)")


def _is_host_path(volume: str) -> bool:
    return volume.startswith(("/", "./", "../", "~"))


def flow_configs(kind: str, *, prefix: str, tag: str, shards: Optional[int], model: Optional[str],
                 namespace: str, model_volume: Optional[str] = None) -> Dict[str, Dict]:
    """{'index': config, 'search': config}: the search flow's shards are the index flow's shard services."""
    options = {"pretrained_model_name_or_path": model_path(model, model_volume)}
    index = container_config(INDEX_FLOW, DEFAULT_INDEX_PORT, prefix, tag, shards, options)
    if int(indexer_of(index).get("replicas", 1)) != 1:
        raise ValueError("an indexer shard is one process with its own volume: replicas of the indexer must be 1")
    names = shard_names(shard_count(index))
    if kind == "kubernetes":
        addresses = [(f"{name}.{namespace}-index.svc", K8S_PORT) for name in names]
    else:
        addresses = [(name, COMPOSE_PORT) for name in names]
    search = shared_search_config(container_config(SEARCH_FLOW, DEFAULT_SEARCH_PORT, prefix, tag, shards, options),
                                  addresses, gateway_uses=image_name(READ_ONLY_GATEWAY_YML, prefix, tag))
    return {"index": index, "search": search}


def export(kind: str, out_dir: str, *, prefix: str = "clipseek", tag: str = "0.1.0", shards: Optional[int] = None,
           model: Optional[str] = None, namespace: str = "clipseek", model_volume: Optional[str] = None) -> List[str]:
    """Write Kubernetes manifests (one folder per flow, and the namespaces) or docker compose files
    (one per flow); returns what was written.

    ``model_volume``: where the encoders read the model from, mounted read-only at ``MODEL_MOUNT`` in every
    encoder of both flows (``model`` then names the folder inside it): on Kubernetes an existing
    PersistentVolumeClaim of that name in each flow's namespace, in docker compose an existing named volume
    or a host folder. Without it the encoders load ``model`` from the hub or from a folder inside the image."""
    if kind not in ("kubernetes", "docker-compose"):
        raise ValueError(f"unknown export kind {kind!r}: kubernetes or docker-compose")
    if model_volume:
        _check_model_volume(kind, model_volume)
    os.environ.setdefault("JINA_GATEWAY_IMAGE", GATEWAY_IMAGE)  # else jina asks the hub which image to use
    configs = flow_configs(kind, prefix=prefix, tag=tag, shards=shards, model=model, namespace=namespace,
                           model_volume=model_volume)
    with _quiet_jina():
        return _write(kind, out_dir, configs, namespace, model_volume)


@contextlib.contextmanager
def _quiet_jina():
    """jina warns of every external executor that it writes no manifest for it, which is the point here:
    errors only meanwhile, unless its log level asks for more than warnings."""
    before = os.environ.get("JINA_LOG_LEVEL")
    if (before or "WARNING").upper() == "WARNING":
        os.environ["JINA_LOG_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("JINA_LOG_LEVEL", None)
        else:
            os.environ["JINA_LOG_LEVEL"] = before


def _encoders(config: Dict) -> List[str]:
    """The names of the flow's encoders (the executors that load the model)."""
    return [e["name"] for e in config["executors"] if "encoder" in e.get("name", "") and not e.get("external")]


def _write(kind: str, out_dir: str, configs: Dict[str, Dict], namespace: str,
           model_volume: Optional[str] = None) -> List[str]:
    from jina import Flow

    skip_empty_argument_check()
    shards_written = shard_names(shard_count(configs["index"]))
    written = []
    storage_class, storage = _storage() if kind == "kubernetes" else (None, DEFAULT_STORAGE)
    os.makedirs(out_dir, exist_ok=True)
    if kind == "kubernetes":
        for name in configs:  # `kubectl apply -R` would apply what an earlier export left there too
            folder = os.path.join(out_dir, name)
            if os.path.isdir(folder) and os.listdir(folder):
                raise ValueError(f"{folder} is not empty (an earlier export?): remove it, or export to another folder")
        target = os.path.join(out_dir, "namespaces.yml")
        _dump_all(target, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"{namespace}-{name}"}}
                           for name in configs])
        written.append(target)
        for name, config in configs.items():
            target = os.path.join(out_dir, name)
            Flow.load_config(config).to_kubernetes_yaml(target, k8s_namespace=f"{namespace}-{name}")
            if name == "index":
                for shard in shards_written:
                    path = os.path.join(target, INDEXER, f"{shard}.yml")
                    _dump_all(path, [stateful_shard(doc, storage_class=storage_class, storage=storage)
                                     for doc in _load_all(path)])
            for encoder in _encoders(config) if model_volume else []:
                folder = os.path.join(target, encoder)
                for path in sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yml")):
                    _dump_all(path, [with_model_claim(doc, model_volume) for doc in _load_all(path)])
            written.append(target)
    else:
        for name, config in configs.items():
            for executor in config["executors"]:
                if not executor.get("external"):
                    # jina would mount ~/.cache/jina over the image's /app; the shards get named volumes below
                    executor["disable_auto_volume"] = True
            target = os.path.join(out_dir, f"docker-compose.{name}.yml")
            Flow.load_config(config).to_docker_compose_yaml(target, network_name=f"{namespace}-{name}")
            compose = _load_all(target)[0]
            encoders = [e.replace("_", "-") for e in _encoders(config)]  # jina's service names
            _dump_all(target, [compose_topology(compose, name, namespace, shards_written, model_volume=model_volume,
                                                encoders=encoders)])
            written.append(target)
    return written


def _storage():
    """(storage class or None for the cluster's default, size) of each shard's claim: jina's own variables."""
    modes = os.environ.get("JINA_K8S_ACCESS_MODES")
    if modes and json.loads(modes) != ACCESS_MODES:
        raise ValueError(f"JINA_K8S_ACCESS_MODES={modes}: an index needs a ReadWriteOnce volume (its SQLite runs in "
                         f"WAL mode, which network file systems break); unset it")
    return os.environ.get("JINA_K8S_STORAGE_CLASS_NAME") or None, os.environ.get("JINA_K8S_STORAGE_CAPACITY") or DEFAULT_STORAGE


def stateful_shard(doc: Dict, *, storage_class: Optional[str] = None, storage: str = DEFAULT_STORAGE) -> Dict:
    """jina's Deployment of one indexer shard as a StatefulSet of one pod whose workspace is its own claim;
    any other document unchanged."""
    if doc.get("kind") != "Deployment":
        return doc
    doc = copy.deepcopy(doc)
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    if int(spec.get("replicas", 1)) != 1:
        raise ValueError(f"{name}: a shard is one process")
    doc["kind"] = "StatefulSet"
    spec.pop("strategy", None)  # a Deployment's; a StatefulSet replaces its one pod in place
    spec["serviceName"] = name  # the shard's Service, which jina writes beside it
    spec["updateStrategy"] = {"type": "RollingUpdate"}
    claim = f"{name}-workspace"
    pod = spec["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "executor"]
    container["volumeMounts"] = [{"name": claim, "mountPath": CONTAINER_WORKSPACE}]
    for variable in container.get("env", []):
        if variable.get("name") == "K8S_DEPLOYMENT_NAME":
            variable["name"] = "K8S_STATEFULSET_NAME"  # as jina's own StatefulSet template names it
    claim_spec = {"accessModes": list(ACCESS_MODES), "resources": {"requests": {"storage": storage}}}
    if storage_class:
        claim_spec["storageClassName"] = storage_class
    spec["volumeClaimTemplates"] = [{"metadata": {"name": claim}, "spec": claim_spec}]
    return doc


def with_model_claim(doc: Dict, claim: str) -> Dict:
    """jina's Deployment of an encoder with the claim ``claim`` mounted read-only at ``MODEL_MOUNT`` in its
    executor container; any other document unchanged."""
    if doc.get("kind") != "Deployment":
        return doc
    doc = copy.deepcopy(doc)
    pod = doc["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "executor"]
    pod["volumes"] = [*pod.get("volumes", []), {"name": MODEL_VOLUME,
                                                 "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
    container["volumeMounts"] = [*container.get("volumeMounts", []),
                                 {"name": MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}]
    return doc


def compose_topology(compose: Dict, flow: str, namespace: str, shards: List[str], *,
                     model_volume: Optional[str] = None, encoders: Sequence[str] = ()) -> Dict:
    """One flow's compose file as jina wrote it, with the two flows' shared parts: the index flow's shard
    services each keep their workspace on a named volume, and join the network ``<namespace>-shards`` with
    the search flow's gateway, which reaches them there. Each file is a compose project of its own."""
    shared = f"{namespace}-shards"
    out = {"name": f"{namespace}-{flow}", **{k: v for k, v in compose.items() if k != "name"}}
    services = out["services"]
    if flow == "index":
        out["networks"][shared] = {"name": shared, "driver": "bridge"}
        missing = [s for s in shards if s not in services]
        if missing:
            raise ValueError(f"no compose service for shard(s) {missing}")
        for shard in shards:
            services[shard]["volumes"] = [f"{shard}-workspace:{CONTAINER_WORKSPACE}"]
            services[shard]["networks"] = [*services[shard]["networks"], shared]
        out["volumes"] = {f"{shard}-workspace": {} for shard in shards}
    else:
        out["networks"][shared] = {"name": shared, "external": True}  # created by the index project
        services["gateway"]["networks"] = [*services["gateway"]["networks"], shared]
    if model_volume:  # every encoder reads the model from it, and writes nothing there
        missing = [e for e in encoders if e not in services]
        if missing:
            raise ValueError(f"no compose service for encoder(s) {missing}")
        for encoder in encoders:
            services[encoder]["volumes"] = [*services[encoder].get("volumes", []), f"{model_volume}:{MODEL_MOUNT}:ro"]
        if not _is_host_path(model_volume):  # a named volume the user made and filled (docker volume create)
            out["volumes"] = {**(out.get("volumes") or {}), model_volume: {"external": True}}
    return out


def _load_all(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _dump_all(path: str, docs: List[Dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
