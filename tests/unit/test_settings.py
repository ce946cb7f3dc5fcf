"""Every `clipseek serve` flag reaches the flows: the settings are built from every field that has a flag."""

import dataclasses

import pytest

from clipseek.cli import _settings, build_parser
from flows.serving import build_flows
from flows.settings import Settings
from executors.params import as_flag, dtype_name

# Flags of `serve` that are not settings of the flows themselves.
NOT_SETTINGS = {"help", "bind", "web", "command", "verbose"}


def _serve_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"]._actions


def test_every_serve_flag_is_a_settings_field():
    fields = {f.name for f in dataclasses.fields(Settings)}
    dests = {a.dest for a in _serve_actions()} - NOT_SETTINGS
    assert dests <= fields, dests - fields


def test_serve_flags_reach_both_flows(tmp_path):
    args = build_parser().parse_args(["serve", "--shards", "2", "--max-megapixels", "1", "--allow-private-urls",
                                      "--model", "some-model", "--batch-size", "8", "--device", "cpu",
                                      "--workspace", str(tmp_path), "--dtype", "bfloat16"])
    s = _settings(args)
    assert (s.shards, s.max_megapixels, s.allow_private_urls) == (2, 1.0, True)
    assert (s.model, s.batch_size, s.device, s.workspace, s.dtype) == ("some-model", 8, "cpu", str(tmp_path), "bfloat16")
    index_flow, search_flow = build_flows(s)
    for flow in (index_flow, search_flow):
        nodes = {d.name: d for d in flow._deployment_nodes.values()}
        encoder = nodes["image_encoder"].args.uses_with
        assert encoder["max_megapixels"] == 1.0 and encoder["allow_private_urls"] is True
        assert encoder["pretrained_model_name_or_path"] == "some-model" and encoder["dtype"] == "bfloat16"
        assert nodes["indexer"].args.shards == 2


def test_a_flag_left_out_keeps_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPSEEK_SHARDS", "3")
    monkeypatch.setenv("CLIPSEEK_ALLOW_PRIVATE_URLS", "on")
    s = _settings(build_parser().parse_args(["serve"]))
    assert s.shards == 3 and s.allow_private_urls is True


@pytest.mark.parametrize("word,expected", [("1", True), ("on", True), ("Yes", True), ("true", True),
                                           ("0", False), ("off", False), ("no", False), ("", False)])
def test_one_reading_of_a_flag(word, expected):
    assert as_flag(word) is expected


def test_a_flag_that_is_neither_is_refused():
    with pytest.raises(ValueError, match="CLIPSEEK_ALLOW_PRIVATE_URLS"):
        as_flag("maybe", "CLIPSEEK_ALLOW_PRIVATE_URLS")


def test_one_reading_of_a_dtype():
    import numpy as np
    import torch

    assert dtype_name("fp16", ("float32", "float16")) == "float16"
    assert dtype_name(np.float32, ("float32",)) == "float32"
    assert dtype_name(torch.bfloat16, ("bfloat16",)) == "bfloat16"
    with pytest.raises(ValueError, match="float32, float16"):
        dtype_name("int4", ("float32", "float16"))


def _internal_ports(flow):
    """Every port jina drew for a flow's pods: executors, shard heads and each shard's replicas."""
    ports = []
    for deployment in flow._deployment_nodes.values():
        ports += list(deployment.args.port) if isinstance(deployment.args.port, list) else [deployment.args.port]
        for replicas in (deployment.pod_args.get("pods") or {}).values():
            for pod in replicas:
                ports += list(pod.port) if isinstance(pod.port, list) else [pod.port]
    return {int(p) for p in ports}


def test_internal_ports_are_drawn_outside_the_ephemeral_range(tmp_path, monkeypatch):
    """A pod's port drawn from the kernel's ephemeral range can be taken by any outgoing connection before the
    pod binds it (a flow failed to start with PortAlreadyUsed that way)."""
    from flows import serving

    span = serving.internal_port_range()
    if span is None:
        pytest.skip(f"no ephemeral port range to read at {serving.EPHEMERAL_RANGE_FILE}")
    monkeypatch.delenv("JINA_RANDOM_PORT_MIN", raising=False)
    monkeypatch.delenv("JINA_RANDOM_PORT_MAX", raising=False)
    with open(serving.EPHEMERAL_RANGE_FILE) as f:
        low, high = map(int, f.read().split()[:2])
    ports = set()
    for flow in build_flows(Settings(model="m", workspace=str(tmp_path), shards=2)):
        ports |= _internal_ports(flow)
    assert len(ports) >= 8, ports
    assert not [p for p in ports if low <= p <= high], (low, high, sorted(ports))
    assert all(span[0] <= p <= span[1] for p in ports)


def test_the_internal_port_range_leaves_the_ephemeral_one(tmp_path):
    from flows.serving import internal_port_range

    def span(text):
        (tmp_path / "range").write_text(text)
        return internal_port_range(str(tmp_path / "range"))

    assert span("32768\t60999\n") == (61000, 65535)
    assert span("40000 65000") == (10000, 39999)
    assert span("10500 65000") is None and span("garbage") is None and internal_port_range(str(tmp_path / "none")) is None


def test_free_ports_leave_the_ephemeral_range_and_the_pods_ports(monkeypatch):
    """A test's gateway port drawn by the OS comes from the ephemeral range, and an outgoing connection took
    one before the flow bound it (PortAlreadyUsed); nor may it be a port jina could draw for a pod."""
    import socket

    from flows import serving

    if serving.internal_port_range() is None:
        pytest.skip(f"no ephemeral port range to read at {serving.EPHEMERAL_RANGE_FILE}")
    with open(serving.EPHEMERAL_RANGE_FILE) as f:
        low, high = map(int, f.read().split()[:2])
    listening, pods = serving.listening_port_range(), serving.pod_port_range()
    assert listening[1] < pods[0] and listening[0] >= serving.internal_port_range()[0]
    ports = [serving.free_port() for _ in range(20)]
    assert all(listening[0] <= p <= listening[1] for p in ports), (listening, ports)
    assert not [p for p in ports if low <= p <= high or pods[0] <= p <= pods[1]]

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:  # a port in use is never handed out
        held.bind(("127.0.0.1", ports[0]))
        held.listen()
        monkeypatch.setattr(serving, "listening_port_range", lambda: (ports[0], ports[0] + 1))
        assert {serving.free_port() for _ in range(10)} == {ports[0] + 1}


def test_free_port_gives_a_port_again_only_when_no_other_binds(monkeypatch):
    """Two ports drawn in a row (an index and a search port, bound later) differ: the draw is random, so two calls
    could otherwise give the same port, which `clipseek serve` refuses."""
    from flows import serving

    low = serving.free_port()
    monkeypatch.setattr(serving, "listening_port_range", lambda: (low, low + 7))
    monkeypatch.setattr(serving, "_handed_out", set())
    free = [p for p in range(low, low + 8) if serving._binds("127.0.0.1", p)]
    drawn = [serving.free_port() for _ in free]
    assert sorted(drawn) == free
    assert serving.free_port() in free  # every one given: one of them again rather than none
