"""The web page of ``clipseek serve --web``: its JSON API over real flows with the shipped demo model,
the page itself in headless Chromium (Debian's, through Playwright), and the serve command."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from clipseek.demo import world
from flows.serving import free_port
from flows.settings import DEMO_MODEL_DIR, PROJECT_ROOT

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")),
                                reason="the demo model is not in data/models")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUERY = "a large red cross on a gray background"  # two pictures of the seed-5 world fit it exactly


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """Both flows on free ports with the 60-picture seed-5 world indexed: (settings, client, root, folder, records)."""
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess
    from flows.settings import Settings

    root = tmp_path_factory.mktemp("web")
    folder = str(root / "world")
    records = world.write_world(folder, n=60, seed=5)
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=DEMO_MODEL_DIR,
                        device="cpu", workspace=str(root / "ws"))
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        assert len(client.index([folder]).indexed) == 60
        yield settings, client, root, folder, records


@pytest.fixture(scope="module")
def web(flows):
    """The page over those flows, served on 127.0.0.1: (url, records, folder)."""
    from clipseek.web import create_app, serve_in_thread

    settings, client, root, folder, records = flows
    with serve_in_thread(create_app(client), "127.0.0.1", free_port()) as server:
        yield server.url, records, folder


def _post_json(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return _open(request)


def _post_file(url, data: bytes, filename: str, limit: int = 5):
    boundary = uuid.uuid4().hex
    parts = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"limit\"\r\n\r\n{limit}\r\n"
             f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=parts, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return _open(request)


def _open(request):
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_api_search_thumbs_and_errors(web):
    url, records, folder = web
    status, _, body = _post_json(url + "api/search", {"text": QUERY, "limit": 5})
    assert status == 200
    hits = json.loads(body)["hits"]
    assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "-red-cross-" in hits[0]["name"] and sum("-red-" in h["name"] for h in hits[:3]) >= 2

    # a feedback round: the liked picture climbs, a disliked one is gone
    liked, disliked = hits[4]["id"], hits[0]["id"]
    status, _, body = _post_json(url + "api/search", {"text": QUERY, "limit": 5, "like": [liked], "unlike": [disliked]})
    again = [h["id"] for h in json.loads(body)["hits"]]
    assert status == 200 and liked in again and again.index(liked) < 4 and disliked not in again

    # a thumbnail of an indexed picture is a small JPEG; an unknown id or a path is not served
    status, headers, data = _open(urllib.request.Request(url + hits[0]["thumb"].lstrip("/")))
    from PIL import Image
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(data)).format == "JPEG"
    status, _, body = _open(urllib.request.Request(url + "api/thumb/0123456789abcdef0123"))
    assert status == 404 and "no indexed picture" in json.loads(body)["error"]
    status, _, _ = _open(urllib.request.Request(url + "api/thumb/..%2F..%2Fetc%2Fpasswd"))
    assert status == 404

    # a malformed filter names the bad part; a good one filters
    status, _, body = _post_json(url + "api/search", {"text": QUERY, "filter": '{"width": {"$near": 3}}'})
    assert status == 400 and "$near" in json.loads(body)["error"] and "Traceback" not in body.decode()
    status, _, body = _post_json(url + "api/search", {"text": QUERY, "filter": '{"width": '})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, _, body = _post_json(url + "api/search", {"text": QUERY, "filter": '{"width": {"$gt": 10000}}'})
    assert status == 200 and json.loads(body)["hits"] == []


def test_api_search_by_image_and_upload_errors(web):
    url, records, folder = web
    picture = next(r["file"] for r in records if r["caption"] == QUERY)
    with open(os.path.join(folder, picture), "rb") as f:
        status, _, body = _post_file(url + "api/search-image", f.read(), picture)
    assert status == 200 and json.loads(body)["hits"][0]["name"] == picture

    status, _, body = _post_file(url + "api/search-image", b"%PDF-1.4 not a picture at all", "notes.pdf")
    assert status == 400 and "not an image" in json.loads(body)["error"]
    status, _, body = _post_file(url + "api/search-image", b"\xff\xd8\xff" + os.urandom(21 * 2**20), "huge.jpg")
    assert status == 413 and "larger than 20 MiB" in json.loads(body)["error"]
    status, _, body = _post_file(url + "api/search-image", b"", "empty.png")
    assert status == 400 and "empty" in json.loads(body)["error"]


def test_page_in_headless_chromium(web, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    url, records, folder = web
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:")) else None)
            page.goto(url)
            results = page.locator("#results")

            def cards(round_):
                page.wait_for_selector(f'#results[data-round="{round_}"]', timeout=30_000)
                return page.eval_on_selector_all(".hit", "els => els.map(e => [e.dataset.id, e.dataset.name])")

            # a text query: thumbnails load, the best results fit it
            page.fill("#q", QUERY)
            page.fill("#limit", "8")
            page.click("#go")
            first = cards(1)
            assert len(first) == 8
            assert "-red-cross-" in first[0][1] and sum("-red-" in n for _, n in first[:3]) >= 2
            page.wait_for_function("() => [...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")

            assert page.evaluate("location.search") == f"?q={QUERY.replace(' ', '+')}&limit=8"

            # more like this: the clicked picture comes first; the box no longer shows the text, the address says it
            clicked = first[3][0]
            page.click(f'.hit[data-id="{clicked}"] img')
            assert cards(2)[0][0] == clicked
            assert page.input_value("#q") == "" and page.evaluate("location.search") == f"?like={clicked}&limit=8"

            # the address of a search is the search: reloaded, it shows the same results again
            page.goto(f"{url}?q={QUERY.replace(' ', '+')}&limit=8")
            assert [i for i, _ in cards(1)] == [i for i, _ in first] and page.input_value("#q") == QUERY
            page.go_back()  # back to "more like this", shown again from its address
            page.wait_for_function(f"() => document.querySelector('.hit')?.dataset.id === '{clicked}'", timeout=30_000)
            assert page.input_value("#q") == "" and page.evaluate("location.search") == f"?like={clicked}&limit=8"
            page.goto(f"{url}?q={QUERY.replace(' ', '+')}&limit=8")
            assert [i for i, _ in cards(1)] == [i for i, _ in first]

            # a feedback round on the text query: the liked result climbs and the page says it moved
            page.click("#go")
            before = [i for i, _ in cards(2)]
            liked = before[5]
            page.click(f'.hit[data-id="{liked}"] button.like')
            after = [i for i, _ in cards(3)]
            assert after != before and after.index(liked) < 5
            assert page.locator(f'.hit[data-id="{liked}"] .move.up').count() == 1
            assert "feedback round (1 liked" in page.inner_text("#info")

            # a bad filter and a non-image upload are explained on the page
            page.fill("#filter", '{"width": {"$near": 3}}')
            page.click("#go")
            page.wait_for_function("() => document.getElementById('error').textContent.includes('$near')")
            assert results.get_attribute("data-round") == "3"
            (tmp_path / "notes.txt").write_text("not a picture")
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            page.wait_for_function("() => document.getElementById('error').textContent.includes('not an image')")
            assert "Traceback" not in page.content()
            assert outside == []
        finally:
            browser.close()


def test_serve_web_command_serves_the_page_and_stops_on_ctrl_c(tmp_path):
    """`clipseek serve --web` prints the page's URL, serves it next to the flows, and Ctrl-C stops all cleanly."""
    from clipseek.cli import _settings, build_parser

    args = build_parser().parse_args(["serve", "--web", "--web-port", "6123"])
    assert args.web and _settings(args).web_port == 6123
    web_port = free_port()
    env = {**os.environ, "CLIPSEEK_WEB_PORT": str(web_port), "HF_HUB_OFFLINE": "1"}
    env.pop("JINA_LOG_LEVEL", None)
    env.pop("GRPC_VERBOSITY", None)
    cmd = [sys.executable, "-m", "clipseek.cli", "serve", "--web", "--model", DEMO_MODEL_DIR, "--device", "cpu",
           "--workspace", str(tmp_path / "ws"), "--index-port", str(free_port()), "--search-port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if "web page" in line:
                break
        page_url = f"http://127.0.0.1:{web_port}/"
        assert any(f"clipseek: web page {page_url}" in line for line in lines), "".join(lines[-20:])
        status, headers, body = _open(urllib.request.Request(page_url))
        assert status == 200 and b'id="results"' in body and b"<script src" not in body
        status, _, body = _post_json(page_url + "api/search", {"text": "a red circle"})
        assert status == 200 and json.loads(body)["hits"] == []  # an empty index, answered through the flows
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "clipseek: stopping" in out and "Traceback" not in out
        console = "".join(lines) + out  # the flows' and gRPC's own notices go to the log file, not here
        assert "absl::InitializeLog" not in console and "goaway" not in console and "WARNING" not in console, console
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---- what the page may read, and who may ask it ------------------------------------------------
def _raw(url, path, method="GET", headers=None, body=None, timeout=30):
    """(status, headers, body) of one request with exactly these headers (Host included, if given)."""
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def _unblock(fifo) -> None:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass


def _png_of(colour, size=(64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_a_thumbnail_is_never_read_from_a_path_that_bytes_only_name(flows, web):
    """An ImageDoc posted by any jina Client with pixels in ``bytes_`` and a ``url`` naming a private file:
    embedded from the bytes and stored under that path, but its thumbnail never shows the private file."""
    from docarray import DocList
    from docarray.documents import ImageDoc
    from jina import Client
    from PIL import Image

    from executors.docs import ImageInput
    from executors.images.imaging import content_hash

    settings, client, root, folder, records = flows
    url = web[0]
    private = root / "private"
    private.mkdir()
    secret = private / "secret.png"
    secret.write_bytes(_png_of((250, 0, 250)))  # the private pixels: magenta
    decoy = _png_of((0, 90, 0))
    answer = Client(host=settings.index_address).post(
        "/index", DocList[ImageDoc]([ImageDoc(url=str(secret), bytes_=decoy)]), return_type=DocList[ImageInput])
    doc_id = answer[0].id
    try:
        assert answer[0].status == "indexed", answer[0].error
        [stored] = client.lookup([doc_id])
        assert stored.found and stored.uri == str(secret) and stored.content_hash == content_hash(decoy)
        status, headers, body = _open(urllib.request.Request(f"{url}api/thumb/{doc_id}"))
        assert status == 404 and headers["Content-Type"] == "application/json", (status, headers["Content-Type"])
        assert "not the picture that was indexed" in json.loads(body)["error"]
        # a picture indexed from its file still has its thumbnail
        hit = client.search("a red cross", limit=1)[0]
        status, headers, data = _open(urllib.request.Request(f"{url}api/thumb/{hit.id}"))
        assert status == 200 and Image.open(io.BytesIO(data)).format == "JPEG"
    finally:
        client.delete([doc_id])


def test_thumbnails_follow_the_read_rule_of_the_encoder(flows, web):
    """Allowed roots on the real path when the file is opened, regular files only."""
    from clipseek.web import create_app, serve_in_thread

    settings, client, root, folder, records = flows
    open_url = web[0]
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "out.png").write_bytes(_png_of((200, 200, 0)))
    (allowed / "swap.png").write_bytes(_png_of((0, 0, 200)))
    (allowed / "pipe-later.png").write_bytes(_png_of((0, 200, 200)))
    report = client.index([str(outside / "out.png"), str(allowed / "swap.png"), str(allowed / "pipe-later.png")])
    assert len(report.indexed) == 3, report.failed
    ids = {os.path.basename(p): h.id for h in client.search("a picture", limit=100)
           for p in [h.uri] if h.uri.startswith((str(allowed), str(outside)))}
    # the file swapped for a symlink to the same bytes outside the roots; the other for a named pipe
    (outside / "swap.png").write_bytes((allowed / "swap.png").read_bytes())
    os.remove(allowed / "swap.png")
    os.symlink(outside / "swap.png", allowed / "swap.png")
    os.remove(allowed / "pipe-later.png")
    os.mkfifo(allowed / "pipe-later.png")
    try:
        with serve_in_thread(create_app(client, allowed_roots=[folder, str(allowed)]), "127.0.0.1", free_port()) as server:
            for name in ("out.png", "swap.png"):
                status, _, body = _open(urllib.request.Request(f"{server.url}api/thumb/{ids[name]}"))
                assert status == 404 and "not readable by this server" in json.loads(body)["error"], (name, status)
                status, headers, _ = _open(urllib.request.Request(f"{open_url}api/thumb/{ids[name]}"))
                assert status == 200 and headers["Content-Type"] == "image/jpeg"  # no roots: the same bytes are shown
            status, _, _ = _open(urllib.request.Request(f"{server.url}api/thumb/{client.search('a red cross', limit=1)[0].id}"))
            assert status == 200
        status, _, body = _raw(open_url, f"/api/thumb/{ids['pipe-later.png']}", timeout=10)  # answered, not blocked
        assert status == 404 and "not readable" in json.loads(body)["error"]
    finally:
        _unblock(allowed / "pipe-later.png")
        client.delete(list(ids.values()))


@pytest.fixture(scope="module")
def bare_page():
    """The page over flows that are not there: what it refuses, it refuses before asking them."""
    from clipseek.client import ClipseekClient
    from clipseek.web import create_app, serve_in_thread

    dead = f"grpc://127.0.0.1:{free_port()}"
    with serve_in_thread(create_app(ClipseekClient(dead, dead, timeout=10)), "127.0.0.1", free_port()) as server:
        yield server


def test_the_page_answers_only_its_own_host(bare_page):
    url, port = bare_page.url, bare_page.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
        status, _, body = _raw(url, "/", headers={"Host": host})
        assert status == 200 and b'id="results"' in body, host
    for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1", f"rebind.127.0.0.1.nip.io:{port}", ""):
        for path in ("/", "/api/thumb/0123456789abcdef0123"):
            status, _, body = _raw(url, path, headers={"Host": host})
            assert status == 403 and "Host header" in json.loads(body)["error"], (host, path, status)
    status, _, body = _raw(url, "/api/search", "POST", {"Host": f"evil.example:{port}", "Content-Type": "application/json"},
                           json.dumps({"text": "a cat"}).encode())
    assert status == 403


def test_cross_site_posts_and_reads_are_refused(bare_page):
    url, port = bare_page.url, bare_page.port
    search = json.dumps({"text": "a cat"}).encode()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{port + 1}"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"}):
        for path in ("/api/search", "/api/search-image"):
            status, _, body = _raw(url, path, "POST", {"Content-Type": "application/json", **headers}, search)
            assert status == 403 and "refused" in json.loads(body)["error"], (headers, path, status)
    status, _, _ = _raw(url, "/api/thumb/0123456789abcdef0123", headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    # its own page's requests go through (to flows that are not there: 503, not 403)
    status, _, body = _raw(url, "/api/search", "POST", {"Content-Type": "application/json", "Sec-Fetch-Site": "same-origin",
                                                        "Origin": f"http://127.0.0.1:{port}"}, search)
    assert status == 503 and "cannot reach" in json.loads(body)["error"]
    status, _, _ = _raw(url, "/", headers={"Sec-Fetch-Site": "cross-site"})  # a link to the page opens it
    assert status == 200


def test_every_request_body_is_capped(bare_page):
    url = bare_page.url
    big = json.dumps({"text": "a cat", "filter": {"x": "y" * 2**21}}).encode()  # 2 MiB, over the 1 MiB cap
    status, _, body = _raw(url, "/api/search", "POST", {"Content-Type": "application/json"}, big)
    assert status == 413 and f"larger than {2**20} bytes" in json.loads(body)["error"]

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(2**21 // 65536):
            yield b" " * 65536

    import http.client
    import urllib.parse

    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        connection.request("POST", "/api/search", body=chunks(), headers={"Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and "larger than" in json.loads(response.read())["error"]
    finally:
        connection.close()
