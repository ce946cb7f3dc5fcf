"""Security: loopback-only listening, allowed roots for local paths, gRPC message size limits,
user-only workspace files, no pickle on network data."""

import glob
import ipaddress
import os
import re
import stat

import psutil
import pytest
import yaml
from docarray import DocList

from executors.docs import ImageInput
from executors.images.imaging import ImageError, check_allowed_root, read_source
from clipseek.client import ClipseekClient, ClipseekError
from flows.serving import INDEX_FLOW, SEARCH_FLOW, build_flows, flow_config, flows_in_subprocess, free_port
from flows.settings import Settings

from tests.conftest import draw_picture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """allowed/ (a picture, a symlink out, a symlink within) and outside/ (a picture)."""
    base = tmp_path_factory.mktemp("roots")
    allowed, outside = base / "allowed", base / "outside"
    allowed.mkdir()
    outside.mkdir()
    inside_pic = draw_picture(allowed / "in.png", "red")
    outside_pic = draw_picture(outside / "out.png", "blue")
    os.symlink(outside_pic, allowed / "link-out.png")
    os.symlink(outside, allowed / "dir-out")
    os.symlink(inside_pic, allowed / "link-in.png")
    return base, allowed, outside, inside_pic, outside_pic


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory, layout):
    _, allowed, *_ = layout
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("workspace")), allowed_roots=[str(allowed)])
    with flows_in_subprocess(settings):
        yield settings, ClipseekClient(settings.index_address, settings.search_address, timeout=60)


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual-stack socket
    return (mapped or address).is_loopback


def test_every_listening_socket_is_loopback(served):
    settings, _ = served
    listening, unreadable = [], []
    for process in psutil.Process().children(recursive=True):
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:  # it ended since it was listed (a zombie included): it listens on nothing
            continue
        except psutil.Error as e:  # one process unread could be the one listening beyond loopback
            unreadable.append((process, e))
            continue
        listening += [c.laddr for c in connections if c.status == psutil.CONN_LISTEN]
    assert not unreadable, f"cannot read the sockets of {unreadable}"
    ports = {addr.port for addr in listening}
    assert {settings.index_port, settings.search_port} <= ports  # both gateways found
    assert len(ports) >= 4, f"expected the gateways and their executors listening, found {listening}"
    not_loopback = [addr for addr in listening if not _loopback(addr.ip)]
    assert not not_loopback, f"listening beyond loopback: {not_loopback}"


def test_executors_listen_on_loopback_even_when_the_gateway_is_bound_wider():
    config = flow_config(INDEX_FLOW, host="0.0.0.0", port=51000, workspace="ws", encoder_options={})
    assert config["with"]["host"] == "0.0.0.0"
    assert [e["host"] for e in config["executors"]] == ["127.0.0.1", "127.0.0.1"]


def test_local_paths_only_under_allowed_roots(served, layout):
    _, client = served
    base, allowed, outside, inside_pic, outside_pic = layout
    client.clear()
    report = client.index([inside_pic, str(allowed / "link-in.png"), outside_pic, "file://" + outside_pic])
    assert report.indexed == [inside_pic]  # the link is the same picture: one entry, under its real path
    failed = dict(report.failed)
    assert sorted(failed) == sorted([outside_pic, "file://" + outside_pic])
    for escape in (allowed / "link-out.png", allowed / "dir-out" / "out.png"):  # symlinks out of the root
        [(source, reason)] = client.index([str(escape)]).failed
        assert source == os.path.realpath(escape), source
        failed[source] = reason
    for reason in failed.values():
        assert reason.startswith("refused: the path is outside the folders this server may read"), reason

    # '..' sent as is (not normalised by our client), and a request that tries to widen the roots
    sneaky = f"{allowed}/../outside/out.png"
    docs = DocList[ImageInput]([ImageInput(id="sneaky", uri=sneaky, url=sneaky)])
    with pytest.raises(ClipseekError, match=r"parameter 'allowed_roots' is fixed when the server starts"):
        client._post(client.index_address, "/index", docs, DocList[ImageInput], {"allowed_roots": [str(outside)]})
    [answer] = client._post(client.index_address, "/index", docs, DocList[ImageInput])
    assert answer.status == "failed" and answer.error.startswith(f"{sneaky}: refused: the path is outside")
    assert client.status().count == 1

    # query by example reads local paths in the search flow: the same roots hold there
    assert {h.uri for h in client.search(image=inside_pic, limit=5)} == {inside_pic}
    for outside_query in (outside_pic, str(allowed / "link-out.png")):
        with pytest.raises(ClipseekError, match="refused: the path is outside the folders"):
            client.search(image=outside_query, limit=5)


def test_allowed_root_checks_in_process(layout, tmp_path):
    base, allowed, outside, inside_pic, outside_pic = layout
    assert check_allowed_root("x", inside_pic, [str(allowed)]) == os.path.realpath(inside_pic)
    assert check_allowed_root("x", outside_pic, None) == os.path.realpath(outside_pic)
    for sneaky in (f"{allowed}/../outside/out.png", str(allowed / "link-out.png"), str(allowed / "dir-out" / "out.png")):
        with pytest.raises(ImageError, match="outside the folders"):
            read_source(sneaky, allowed_roots=[str(allowed)])
    # a root that is a prefix of another folder's name does not cover it
    (base / "allowed-not").mkdir(exist_ok=True)
    other = draw_picture(base / "allowed-not" / "x.png", "green")
    with pytest.raises(ImageError, match="outside the folders"):
        read_source(other, allowed_roots=[str(allowed)])
    assert read_source(other, allowed_roots=[str(allowed), str(base / "allowed-not")]).data
    with pytest.raises(ImageError, match="outside the folders"):
        read_source(inside_pic, allowed_roots=[])  # no root: nothing local is read


def test_allow_root_flag_and_environment(monkeypatch, tmp_path):
    from clipseek.cli import _settings, build_parser

    args = build_parser().parse_args(["serve", "--allow-root", str(tmp_path / "a"), "--allow-root", str(tmp_path / "b")])
    assert _settings(args).allowed_roots == [str(tmp_path / "a"), str(tmp_path / "b")]
    monkeypatch.delenv("CLIPSEEK_ALLOWED_ROOTS", raising=False)
    assert Settings().allowed_roots is None  # the laptop default: no restriction
    monkeypatch.setenv("CLIPSEEK_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path / "x"), str(tmp_path / "y")]))
    assert Settings().allowed_roots == [str(tmp_path / "x"), str(tmp_path / "y")]
    assert _settings(build_parser().parse_args(["serve"])).allowed_roots == [str(tmp_path / "x"), str(tmp_path / "y")]

    index_flow, search_flow = build_flows(Settings(model="m", workspace=str(tmp_path / "ws"),
                                                   allowed_roots=[str(tmp_path / "x")]))
    encoder = {d.name: d for d in index_flow._deployment_nodes.values()}["image_encoder"]
    assert encoder.args.uses_with["allowed_roots"] == [str(tmp_path / "x")]
    query_encoder = {d.name: d for d in search_flow._deployment_nodes.values()}["image_encoder"]
    assert query_encoder.args.uses_with["allowed_roots"] == [str(tmp_path / "x")]


def test_grpc_message_size_limits(served, layout):
    settings, client = served
    inside_pic = layout[3]
    client.index([inside_pic])  # something to find, whichever tests ran before
    before = client.status().count
    for path, limit in ((INDEX_FLOW, 256 * 2**20), (SEARCH_FLOW, 64 * 2**20)):
        with open(path) as f:
            assert yaml.safe_load(f)["with"]["grpc_server_options"]["grpc.max_receive_message_length"] == limit
    short = [(h.uri, round(h.score, 4)) for h in client.search("a red circle " * 40, limit=3)]  # cut at 77 tokens
    assert inside_pic in {uri for uri, _ in short}
    with pytest.raises(ClipseekError) as e:
        client.search("x" * (65 * 2**20))
    print(e.value)
    # the search gateway (gRPC's "SERVER:") refuses it by its own limit of 64 MiB, in a short message
    refused = re.search(r"/search failed: SERVER: Received message larger than max \((\d+) vs\. (\d+)\)", str(e.value))
    assert refused, e.value
    assert int(refused.group(2)) == 64 * 2**20 < 65 * 2**20 <= int(refused.group(1))
    assert str(e.value).startswith(settings.search_address) and len(str(e.value)) < 400
    # the server keeps serving: a request under the limit (but over gRPC's 4 MiB default) is answered in full,
    # the same hits as the same query sent short, and so is a small one
    big = client.search("a red circle " * (10 * 2**20 // 13), limit=3)
    assert [(h.uri, round(h.score, 4)) for h in big] == short
    assert [(h.uri, round(h.score, 4)) for h in client.search("a red circle " * 40, limit=3)] == short
    assert client.status().count == before  # refused requests changed nothing, and the index still answers


def test_workspace_files_are_user_only(served, layout):
    settings, client = served
    _, allowed, _, inside_pic, _ = layout
    client.index([inside_pic], force=True)
    client.search("red", limit=1)
    [db] = glob.glob(os.path.join(settings.workspace, "**", "meta.sqlite"), recursive=True)
    store = os.path.dirname(db)
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    names = os.listdir(store)
    assert {"meta.sqlite", "vectors.f32", "write.lock"} <= set(names)
    for name in names:
        mode = stat.S_IMODE(os.stat(os.path.join(store, name)).st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}: readable by others"


def test_no_pickle_on_network_data():
    """Nothing in the project unpickles: requests are protobuf (docarray), files are float32 rows and SQLite."""
    pattern = re.compile(r"\b(import pickle|from pickle|cPickle|import dill|marshal\.loads|joblib\.load|"
                         r"allow_pickle\s*=\s*True|torch\.load\(|yaml\.load\(|yaml\.unsafe_load|pickle\.loads?)")
    offenders = []
    for folder in ("executors", "flows", "clipseek"):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if pattern.search(line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    with open(os.path.join(ROOT, "flows", "serving.py"), encoding="utf-8") as f:
        assert "yaml.safe_load" in f.read()
