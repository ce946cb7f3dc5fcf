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
def web(tmp_path_factory):
    """Both flows on free ports with the 60-picture seed-5 world indexed, and the page served on 127.0.0.1."""
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess
    from flows.settings import Settings
    from clipseek.web import create_app, serve_in_thread

    root = tmp_path_factory.mktemp("web")
    folder = str(root / "world")
    records = world.write_world(folder, n=60, seed=5)
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=DEMO_MODEL_DIR,
                        device="cpu", workspace=str(root / "ws"))
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        assert len(client.index([folder]).indexed) == 60
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

            # more like this: the clicked picture comes first
            clicked = first[3][0]
            page.click(f'.hit[data-id="{clicked}"] img')
            assert cards(2)[0][0] == clicked

            # a feedback round on the text query: the liked result climbs and the page says it moved
            page.click("#go")
            before = [i for i, _ in cards(3)]
            liked = before[5]
            page.click(f'.hit[data-id="{liked}"] button.like')
            after = [i for i, _ in cards(4)]
            assert after != before and after.index(liked) < 5
            assert page.locator(f'.hit[data-id="{liked}"] .move.up').count() == 1
            assert "feedback round (1 liked" in page.inner_text("#info")

            # a bad filter and a non-image upload are explained on the page
            page.fill("#filter", '{"width": {"$near": 3}}')
            page.click("#go")
            page.wait_for_function("() => document.getElementById('error').textContent.includes('$near')")
            assert results.get_attribute("data-round") == "4"
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
    env = {**os.environ, "CLIPSEEK_WEB_PORT": str(web_port), "HF_HUB_OFFLINE": "1", "JINA_LOG_LEVEL": "WARNING"}
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
