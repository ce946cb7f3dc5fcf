"""What the README promises of the `clipseek` command, read from what it prints: index --force and --prune,
search by example, query arithmetic and feedback, classify, duplicates, clear; the transport limits
(redirects, the default download cap), the client's remote path that sends the bytes, and the web page's
redirect for a picture indexed from a URL.

One `clipseek serve` (the shipped demo model, --allow-private-urls for the test's HTTP server on loopback,
--allow-root on the folder of the pictures) serves every test of this module."""

import http.client
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipseek.client import ClipseekClient
from clipseek.demo import world
from executors.images.imaging import uri_id
from flows.serving import free_port
from flows.settings import DEMO_MODEL_DIR

from tests.conftest import draw_picture
from tests.e2e.test_cli import Server, _env, _run

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")),
                                reason="the demo model is not in data/models")

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
DEFAULT_CAP = 52428800  # README: --max-download-bytes default, 50 MiB
N_WORLD = 40


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    png = b""
    requested: list = []

    def do_GET(self):
        path = self.path.split("?")[0]
        self.requested.append(path)
        chain = re.fullmatch(r"/chain-(\w+)/(\d+)\.png", path)
        if chain and int(chain.group(2)) > 0:  # one redirect per step down to /chain-X/0.png
            self.send_response(302)
            self.send_header("Location", f"/chain-{chain.group(1)}/{int(chain.group(2)) - 1}.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif chain or path == "/picture.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif path == "/claims-too-big.png":  # says it is one byte over the default cap, sends a little
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(DEFAULT_CAP + 1))
            self.end_headers()
            try:
                self.wfile.write(self.png)
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    _Handler.png = open(draw_picture(folder / "p.png", "blue", shape="square"), "rb").read()
    _Handler.requested = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.requested
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module: (env for the CLI, in-process client, base folder, allowed root, world)."""
    base = tmp_path_factory.mktemp("promises")
    root = base / "root"  # the only folder the server reads local paths from
    folder = root / "world"
    records = world.write_world(str(folder), n=N_WORLD, seed=3)
    original = folder / records[0]["file"]
    copy = folder / "zz-copy-of-the-first.jpg"  # the same bytes under another name
    shutil.copyfile(original, copy)
    env = _env(DEMO_MODEL_DIR, base / "ws", (free_port(), free_port()))
    for name in PROXY_VARS + ("CLIPSEEK_SHARDS", "CLIPSEEK_ALLOWED_ROOTS", "CLIPSEEK_URL_TIMEOUT",
                              "CLIPSEEK_MAX_DOWNLOAD_BYTES", "CLIPSEEK_ALLOW_PRIVATE_URLS"):
        env.pop(name, None)
    server = Server(env, ["--allow-private-urls", "--allow-root", str(root)])
    host = "grpc://127.0.0.1"
    client = ClipseekClient(f"{host}:{env['CLIPSEEK_INDEX_PORT']}", f"{host}:{env['CLIPSEEK_SEARCH_PORT']}", timeout=120)
    try:
        report = client.index([str(folder)])
        assert len(report.indexed) == N_WORLD + 1 and not report.failed, report.failed
        yield {"env": env, "client": client, "base": base, "root": root, "folder": folder,
               "by_file": {r["file"]: r for r in records}, "original": str(original), "copy": str(copy)}
    finally:
        client.close()
        server.stop()


def _cli(args, env):
    out = _run(args, env)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    return out


def _ranked(out) -> list:
    """[(uri, id, score)] of `clipseek search --json`, best first."""
    assert out.returncode == 0, out.stderr
    return [(h["uri"], h["id"], h["score"]) for h in json.loads(out.stdout)]


def _colour(uri, by_file):
    return by_file[os.path.basename(uri)]["colour"] if os.path.basename(uri) in by_file else None


def _mean_rank(uris, colour, by_file) -> float:
    ranks = [i for i, u in enumerate(uris, 1) if _colour(u, by_file) == colour]
    assert ranks, f"no {colour} picture among the results"
    return sum(ranks) / len(ranks)


# ---- index --------------------------------------------------------------------------------------------

def test_index_force_re_embeds_unchanged_files(served):
    client, folder = served["client"], served["folder"]
    n = N_WORLD + 1
    again = client.index([str(folder)])  # nothing changed: all skipped without --force
    assert len(again.unchanged) == n and not again.indexed
    out = _cli(["index", str(folder), "--force"], served["env"])
    assert out.returncode == 0, out.stderr
    assert f"indexed {n}, unchanged 0 (skipped), failed 0" in out.stdout, out.stdout
    assert client.status().count == n  # re-embedded in place, not added twice


def test_index_prune_removes_files_gone_from_the_given_folders(served):
    client, root = served["client"], served["root"]
    album, elsewhere = root / "album", root / "elsewhere"
    album.mkdir()
    elsewhere.mkdir()
    kept = draw_picture(album / "kept.png", "green")
    gone = draw_picture(album / "gone.png", "red")
    outside = draw_picture(elsewhere / "outside.png", "yellow")  # gone too, but not under the folder given
    assert len(client.index([str(album), outside]).indexed) == 3
    os.remove(gone)
    os.remove(outside)
    out = _cli(["index", str(album), "--prune"], served["env"])
    assert out.returncode == 0, out.stderr
    assert "indexed 0, unchanged 1 (skipped), failed 0" in out.stdout and "pruned 1 (files gone)" in out.stdout, out.stdout
    found = {d.id: d.found for d in client.lookup([uri_id(kept), uri_id(gone), uri_id(outside)])}
    assert found == {uri_id(kept): True, uri_id(gone): False, uri_id(outside): True}
    client.delete([uri_id(kept), uri_id(outside)])


# ---- search -------------------------------------------------------------------------------------------

def test_search_by_example_image_finds_that_picture_first(served):
    by_file, folder = served["by_file"], served["folder"]
    name = sorted(by_file)[5]
    out = _cli(["search", "--image", str(folder / name), "-k", "3", "--json"], served["env"])
    hits = _ranked(out)
    assert len(hits) == 3 and hits[0][0] == str(folder / name), hits
    assert hits[0][2] == pytest.approx(1.0, abs=1e-3) and hits[1][2] < hits[0][2]


def test_plus_and_minus_move_the_order_their_way(served):
    client, by_file, env = served["client"], served["by_file"], served["env"]
    colour = "red" if sum(r["colour"] == "red" for r in by_file.values()) >= 3 else max(
        world.COLOURS, key=lambda c: sum(r["colour"] == c for r in by_file.values()))
    text, n = "a large shape", N_WORLD + 1
    base = [h.uri for h in client.search(text, limit=n)]
    plus = [u for u, _, _ in _ranked(_cli(["search", text, "--plus", colour, "-k", str(n), "--json"], env))]
    minus = [u for u, _, _ in _ranked(_cli(["search", text, "--minus", colour, "-k", str(n), "--json"], env))]
    assert sorted(plus) == sorted(minus) == sorted(base)  # the same pictures, in other orders
    r_base, r_plus, r_minus = (_mean_rank(u, colour, by_file) for u in (base, plus, minus))
    assert r_plus < r_base - 1 and r_minus > r_base + 1, (r_plus, r_base, r_minus)
    # towards: the top of the list is that colour
    k = sum(r["colour"] == colour for r in by_file.values())
    assert k >= 4
    assert sum(_colour(u, by_file) == colour for u in plus[:k]) >= k - 2, plus[:k]


def test_like_pulls_a_picture_up_and_like_weight_sets_how_far(served):
    client, env = served["client"], served["env"]
    text, n = "three small circles on a white background", N_WORLD + 1
    base = client.search(text, limit=n)
    liked = base[len(base) // 2]  # from the middle of the list
    before = [h.id for h in base].index(liked.id)
    liked_hits = _ranked(_cli(["search", text, "--like", liked.id, "-k", str(n), "--json"], env))
    after = [i for _, i, _ in liked_hits].index(liked.id)
    assert after < before - 2, (before, after)
    # like_weight=0: the liked picture counts for nothing, the order and scores are the text's own
    zero = _ranked(_cli(["search", text, "--like", liked.id, "--weight", "like_weight=0", "-k", str(n), "--json"], env))
    assert [i for _, i, _ in zero] == [h.id for h in base]
    assert [s for _, _, s in zero] == pytest.approx([h.score for h in base], abs=1e-4)


def test_more_like_this_alone_puts_the_liked_picture_first(served):
    client = served["client"]
    liked = client.search("a small star", limit=N_WORLD)[-1]  # the least like the text
    out = _cli(["search", "--like", liked.id, "-k", "3"], served["env"])
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == ["1", "2", "3"], out.stdout
    assert rows[0][2] == liked.uri and rows[0][3] == f"[{liked.id}]" and float(rows[0][1]) == pytest.approx(1.0, abs=1e-3)


# ---- classify, duplicates ---------------------------------------------------------------------------------

def test_classify_prints_each_label_with_probabilities_summing_to_one(served):
    by_file, folder = served["by_file"], served["folder"]
    name = sorted(by_file)[1]
    labels = ["circle", "square", "heart"]  # none is the picture's own shape: the probability is shared out
    assert by_file[name]["shape"] not in labels
    out = _cli(["classify", str(folder / name), "--labels", ",".join(labels), "--template", "a {}"], served["env"])
    assert out.returncode == 0, out.stderr
    rows = [re.fullmatch(r"\s*([\d.]+)%\s+(.+)", line) for line in out.stdout.splitlines() if line.strip()]
    assert all(rows) and len(rows) == 3, out.stdout
    printed = {m.group(2): float(m.group(1)) for m in rows}
    assert sorted(printed) == sorted(labels), out.stdout  # each label once
    assert sum(printed.values()) == pytest.approx(100.0, abs=0.03), out.stdout  # each rounded to 0.01 %
    assert all(1.0 < p < 99.0 for p in printed.values()), out.stdout  # shared out, not one label taking all
    assert list(printed.values()) == sorted(printed.values(), reverse=True), out.stdout  # most likely first


def test_duplicates_groups_an_exact_copy_and_refuses_a_threshold_out_of_range(served):
    out = _cli(["duplicates"], served["env"])
    assert out.returncode == 0, out.stderr
    groups, current = [], None
    for line in out.stdout.splitlines()[1:]:
        if line.startswith("group "):
            current = []
            groups.append(current)
        elif line.strip():
            score, uri = line.split(maxsplit=1)
            current.append((uri, float(score)))
    with_copy = [g for g in groups if served["copy"] in [u for u, _ in g]]
    assert len(with_copy) == 1, out.stdout
    assert sorted(u for u, _ in with_copy[0]) == sorted([served["original"], served["copy"]]), out.stdout
    assert [s for _, s in with_copy[0]] == [1.0, 1.0], out.stdout  # the same bytes: cosine 1
    assert re.match(rf"{len(groups)} groups of near-identical images \(cosine >= 0.95\)", out.stdout), out.stdout

    for bad in ("1.5", "0.2", "high"):
        refused = _run(["duplicates", "--threshold", bad], served["env"])
        assert refused.returncode == 2 and "usage: clipseek duplicates" in refused.stderr, refused.stderr
        assert "argument --threshold" in refused.stderr and refused.stdout == ""


# ---- transport --------------------------------------------------------------------------------------------

def test_three_redirects_are_followed_a_fourth_is_refused(served, site):
    base, requested = site
    three, four, too_big = f"{base}/chain-a/3.png", f"{base}/chain-b/4.png", f"{base}/claims-too-big.png"
    out = _cli(["index", three, four, too_big], served["env"])
    assert out.returncode == 1
    assert "indexed 1, unchanged 0 (skipped), failed 2" in out.stdout, out.stdout
    assert f"  failed: {four}: more than 3 redirects" in out.stdout, out.stdout
    # the default cap of the server (no --max-download-bytes): 50 MiB
    assert f"  failed: {too_big}: download of {DEFAULT_CAP + 1} bytes is over the {DEFAULT_CAP}-byte cap" in out.stdout
    assert [p for p in requested if p.startswith("/chain-a/")] == [f"/chain-a/{i}.png" for i in (3, 2, 1, 0)]
    assert [p for p in requested if p.startswith("/chain-b/")] == [f"/chain-b/{i}.png" for i in (4, 3, 2, 1)]
    assert served["client"].lookup([uri_id(three)])[0].found and not served["client"].lookup([uri_id(four)])[0].found


def test_send_bytes_indexes_a_file_the_server_may_not_read_and_stores_its_path(served):
    """The server reads local paths under --allow-root only: a file outside it is refused by path, and indexed
    when the client sends its bytes (as it does for a remote server)."""
    client, env = served["client"], served["env"]
    outside = served["base"] / "outside"
    outside.mkdir()
    path = draw_picture(outside / "sent.png", "yellow", shape="square")
    by_path = client.index([path])
    assert not by_path.indexed and by_path.failed and "outside the folders this server may read" in by_path.failed[0][1]
    remote = ClipseekClient(client.index_address, client.search_address, send_bytes=True, timeout=120)
    try:
        report = remote.index([path])
        assert report.indexed == [path] and not report.failed, report.failed
        [doc] = client.lookup([uri_id(path)])
        assert doc.found and doc.uri == path and doc.size == os.path.getsize(path)
        assert doc.mtime == pytest.approx(os.stat(path).st_mtime, abs=1e-6)
        # the picture's own vector: searched with the same bytes, it is first at cosine 1
        hit = remote.search(image=path, limit=1)[0]
        assert hit.uri == path and hit.score == pytest.approx(1.0, abs=1e-3)
        assert remote.index([path]).unchanged == [path]  # unchanged by size and mtime, as a path would be
    finally:
        remote.close()
        client.delete([uri_id(path)])


def test_thumbnail_of_a_picture_indexed_from_a_url_redirects_to_it(served, site):
    from clipseek.web import create_app, serve_in_thread

    client = served["client"]
    url = f"{site[0]}/picture.png"
    assert client.index([url]).indexed == [url]
    port = free_port()
    with serve_in_thread(create_app(client), "127.0.0.1", port):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", f"/api/thumb/{uri_id(url)}")
        answer = connection.getresponse()
        answer.read()
        connection.close()
    assert answer.status == 307 and answer.getheader("Location") == url
    client.delete([uri_id(url)])


# ---- last: it empties the shared index ---------------------------------------------------------------------

def test_clear_yes_empties_the_index_and_status_says_so(served):
    env = served["env"]
    assert served["client"].status().count > 0
    out = _cli(["clear", "--yes"], env)
    assert out.returncode == 0 and out.stdout.strip() == "cleared; 0 documents left", out.stdout + out.stderr
    status = _cli(["status"], env)
    assert status.returncode == 0
    assert status.stdout.startswith("the index is empty: add pictures with `clipseek index DIR`"), status.stdout
    assert served["client"].search("a shape", limit=5) == []
