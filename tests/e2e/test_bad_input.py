"""Bad input, end to end: every kind of broken picture, URL and query in one batch with good ones,
through the real gRPC flows. Each bad one gets its own error naming it and the cause; each good one
is indexed (upright, first frame, any colour mode); the server keeps serving.

Also: the SSRF guard (loopback refused by default, a redirect into a refused address refused) and
file names that are not UTF-8, from the client's folder walk to the search result.
"""

import io
import os
import re
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from docarray import DocList
from PIL import Image

import clipseek.client as client_module
from executors.images import netguard
from executors.clip_image_encoder import CLIPImageEncoder
from executors.docs import ImageInput
from executors.params import RequestError
from executors.images.imaging import ImageError, local_path, path_uri, read_source, uri_id
from clipseek.client import ClipseekClient, ClipseekError
from flows.serving import flows_in_subprocess, free_port
from flows.settings import Settings

from tests.conftest import draw_picture

CAP = 4 * 2**20  # max_download_bytes for the batch
URL_TIMEOUT = 1.0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


GOOD_PNG = _png(Image.new("RGB", (40, 30), (10, 200, 30)))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    release = threading.Event()  # set at teardown: stalled handlers give up

    def _send(self, status, ctype, body, length=True):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        try:
            if path == "/good.png":
                self._send(200, "image/png", GOOD_PNG)
            elif path == "/page":
                self._send(200, "text/html; charset=utf-8", b"<html><body>a web page</body></html>")
            elif path == "/stall":  # accepts the connection, never answers
                self.release.wait(30)
            elif path == "/drip":  # answers, then a byte now and then: never finishes
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(300):
                    if self.release.wait(0.2):
                        break
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
            elif path == "/huge":  # says how big it is
                self._send(200, "image/png", b"\0" * (CAP + 1000))
            elif path == "/huge-stream":  # does not say: the cap must hold while reading
                self._send(200, "image/png", b"\0" * (CAP + 1000), length=False)
            elif path == "/to-loopback":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/good.png")
                self.end_headers()
            else:
                self._send(404, "text/plain", b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _Handler.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=tiny_model,
                        device="cpu", workspace=str(tmp_path_factory.mktemp("workspace")),
                        allow_private_urls=True,  # the test's HTTP server is on loopback
                        url_timeout=URL_TIMEOUT, max_download_bytes=CAP)
    with flows_in_subprocess(settings):
        yield settings, ClipseekClient(settings.index_address, settings.search_address, timeout=120)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_bomb(path) -> None:
    """A 100-byte PNG whose header claims 30000 x 30000 pixels."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


def make_inputs(root):
    """(good sources, {bad source: cause pattern}, facts) for every local case."""
    root.mkdir()
    good, bad, facts = [], {}, {}

    good.append(draw_picture(root / "plain.png", "red"))
    good.append(draw_picture(root / "plain.jpg", "blue", shape="square"))

    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(jpeg, "JPEG")
    jpeg = jpeg.getvalue()
    (root / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2] + bytes(len(jpeg) // 2))
    bad[str(root / "corrupt.jpg")] = r"cannot decode image|not a recognised"
    (root / "empty.png").write_bytes(b"")
    bad[str(root / "empty.png")] = r"empty file \(0 bytes\)"
    png = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    bad[str(root / "truncated.png")] = r"cannot decode image \(image file is truncated"
    (root / "notes.jpg").write_text("this is a text file, not a picture\n" * 20)
    bad[str(root / "notes.jpg")] = r"not a recognised image format"
    make_bomb(root / "bomb.png")
    bad[str(root / "bomb.png")] = r"image too large \(over 178956970 pixels, 179\.0 megapixels: the most this server decodes"

    Image.new("CMYK", (50, 40), (0, 200, 200, 0)).save(root / "cmyk.jpg", "JPEG")
    Image.fromarray(np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)).save(root / "deep16.png")
    assert Image.open(root / "deep16.png").mode.startswith("I")
    Image.fromarray(np.tile(np.arange(50, dtype=np.uint8) * 5, (40, 1)), "L").save(root / "gray.png")
    pal = Image.new("P", (50, 40), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (10, 10, 40, 30))
    pal.save(root / "palette.png", transparency=0)
    assert "transparency" in Image.open(root / "palette.png").info
    good += [str(root / n) for n in ("cmyk.jpg", "deep16.png", "gray.png", "palette.png")]

    frames = [Image.new("RGB", (48, 48), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(root / "anim.gif").n_frames == 3
    first = Image.open(root / "anim.gif").convert("RGB")
    first.save(root / "frame0.png")
    frames[2].save(root / "frame2.png")
    good += [str(root / n) for n in ("anim.gif", "frame0.png", "frame2.png")]

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 wide x 40 high, shown rotated 90 degrees: 40 x 60
    Image.new("RGB", (60, 40), (120, 60, 200)).save(root / "exif.jpg", "JPEG", exif=exif)
    good.append(str(root / "exif.jpg"))
    facts["exif"] = (str(root / "exif.jpg"), (40, 60))

    y = np.linspace(0, 255, 6000, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 255, 8000, dtype=np.float32)[None, :, None]
    big = np.empty((6000, 8000, 3), dtype=np.uint8)
    big[..., 0:1], big[..., 1:2], big[..., 2:3] = y, x, 128
    Image.fromarray(big).save(root / "large.jpg", "JPEG", quality=70)
    del big
    assert os.path.getsize(root / "large.jpg") < CAP, "the large photo must fit under the download cap"
    good.append(str(root / "large.jpg"))
    facts["large"] = (str(root / "large.jpg"), (8000, 6000))

    odd = os.fsdecode(os.path.join(os.fsencode(str(root)), b"caf\xff-\xe9t\xe9.png"))
    draw_picture(odd, "yellow")
    good.append(odd)
    facts["odd"] = odd
    return good, bad, facts


def test_one_batch_of_every_bad_input(served, http_base, tmp_path, monkeypatch):
    settings, client = served
    client.clear()
    good, bad, facts = make_inputs(tmp_path / "pics")
    dead = f"http://127.0.0.1:{_closed_port()}/gone.png"
    good.append(f"{http_base}/good.png")
    bad.update({
        dead: r"cannot fetch \(.*refused",
        f"{http_base}/page": r"server answered 'text/html; charset=utf-8', not an image",
        f"{http_base}/missing.png": r"HTTP 404 Not Found",
        f"{http_base}/stall": r"timed out after 1 s",
        f"{http_base}/drip": r"timed out after 1 s",
        f"{http_base}/huge": rf"download of {CAP + 1000} bytes is over the {CAP}-byte cap",
        f"{http_base}/huge-stream": rf"download over the {CAP}-byte cap",
    })
    sources = list(good) + list(bad)
    sources = sources[1::2] + sources[::2]  # good and bad interleaved

    raw_errors = {}
    real_reason = client_module._reason

    def record(error, source):
        raw_errors[source] = error
        return real_reason(error, source)

    monkeypatch.setattr(client_module, "_reason", record)
    t0 = time.monotonic()
    report = client.index(sources, batch_size=len(sources))
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"one batch took {elapsed:.0f} s: a stalled URL held the batch"

    wanted_good = sorted(path_uri(s) for s in good)
    assert sorted(report.indexed) == wanted_good, report.failed
    failed = dict(report.failed)
    assert sorted(failed) == sorted(bad)
    for source, pattern in bad.items():
        assert raw_errors[source].startswith(f"{source}: "), raw_errors[source]  # the error names its input
        assert re.search(pattern, failed[source]), (source, failed[source])
        assert "Traceback" not in failed[source]

    status = client.status()
    assert status.count == len(good)
    hits = {h.id: h for h in client.search("a photo", limit=100)}
    assert set(hits) == {uri_id(s) for s in good}

    path, size = facts["exif"]
    assert (hits[uri_id(path)].width, hits[uri_id(path)].height) == size  # stored upright
    path, size = facts["large"]
    assert (hits[uri_id(path)].width, hits[uri_id(path)].height) == size

    # animated GIF: embedded from its first frame, the same pixels as frame0.png, not as the last frame
    root = tmp_path / "pics"
    for text in ("a photo", "red", "blue square"):
        scores = {h.uri: h.score for h in client.search(text, limit=100)}
        assert scores[str(root / "anim.gif")] == pytest.approx(scores[str(root / "frame0.png")], abs=1e-4)
    assert any(abs(s[str(root / "anim.gif")] - s[str(root / "frame2.png")]) > 1e-4
               for s in [{h.uri: h.score for h in client.search(t, limit=100)} for t in ("a photo", "red", "blue")])

    # a file name that is not UTF-8: indexed, stored, found, and the hit leads back to the very file
    odd = facts["odd"]
    hit = hits[uri_id(odd)]
    assert hit.uri.startswith("file://") and "%FF" in hit.uri
    assert local_path(hit.uri) == odd and os.fsencode(local_path(hit.uri)).endswith(b"caf\xff-\xe9t\xe9.png")
    assert read_source(hit.uri).data == open(odd, "rb").read()
    # a second run: every good file is unchanged (the odd name included), the server still answers
    again = client.index([str(root)])
    assert not again.indexed and set(s for s, _ in again.failed) == {s for s in bad if s.startswith(str(root))}
    assert path_uri(odd) in again.unchanged or odd in again.unchanged


def test_queries_empty_and_very_long(served, picture_dir):
    _, client = served
    root, paths = picture_dir
    client.clear()
    assert len(client.index(paths).indexed) == len(paths)
    with pytest.raises(ClipseekError, match="empty query"):
        client.search("")
    with pytest.raises(ClipseekError, match="empty query"):
        client.search(" \n\t ")
    long_query = ("a red circle on a pale background " * 400)[:10_000]
    assert len(long_query) == 10_000
    hits = client.search(long_query, limit=3)  # truncated to the model's 77 tokens, answered
    assert len(hits) == 3 and {h.uri for h in hits} <= set(paths)
    assert hits[0].score >= hits[-1].score


def test_duplicate_ids_in_one_batch(served, picture_dir):
    _, client = served
    root, paths = picture_dir
    client.clear()
    docs = DocList[ImageInput]([ImageInput(id="same-id", uri=paths[0], url=paths[0]),
                                ImageInput(id="other", uri=paths[1], url=paths[1]),
                                ImageInput(id="same-id", uri=paths[2], url=paths[2])])
    answer = client._post(client.index_address, "/index", docs, DocList[ImageInput])
    by_uri = {d.uri: d for d in answer}
    assert by_uri[paths[0]].status == "failed"
    assert by_uri[paths[0]].error.startswith(paths[0]) and "duplicate id same-id" in by_uri[paths[0]].error
    assert by_uri[paths[1]].status == by_uri[paths[2]].status == "indexed"
    assert client.status().count == 2
    hits = {h.id: h.uri for h in client.search("a photo", limit=10)}
    assert hits == {"same-id": paths[2], "other": paths[1]}  # the later document won


def test_loopback_url_refused_by_default(tiny_model, http_base):
    """Off unless the server is started with it; a request cannot switch it on."""
    url = f"{http_base}/good.png?default-settings"
    default = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model)
    docs = DocList[ImageInput]([ImageInput(url=url, uri=url)])
    with pytest.raises(RequestError, match=r"'allow_private_urls' is fixed when the server starts \(clipseek serve --allow-private-urls\)"):
        default.encode(docs, parameters={"allow_private_urls": True})
    default.encode(docs)
    assert docs[0].embedding is None and docs[0].status == "failed"
    reason = docs[0].error
    assert reason.startswith(url) and "refused" in reason and "non-public address 127.0.0.1" in reason
    assert "allow_private_urls" in reason
    opted_in = CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, allow_private_urls=True)
    docs = DocList[ImageInput]([ImageInput(url=url, uri=url)])
    opted_in.encode(docs)
    assert docs[0].embedding is not None and docs[0].error is None


def test_redirect_to_a_refused_address_is_refused(http_base, monkeypatch):
    """An allowed host that redirects into the server's own network is refused at the hop.

    For the test, 127.0.0.1 (where the test server listens) counts as public and the made-up host
    pictures.test resolves to it; the redirect goes to 127.0.0.2, which stays refused."""
    import ipaddress

    real_public, real_resolve = netguard._public, socket.getaddrinfo
    monkeypatch.setattr(netguard, "_public", lambda a: a == ipaddress.ip_address("127.0.0.1") or real_public(a))

    def resolve(host, *args, **kwargs):
        if host == "pictures.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
        return real_resolve(host, *args, **kwargs)

    monkeypatch.setattr(netguard, "_resolve", resolve)
    port = http_base.rsplit(":", 1)[1]
    # pictures.test exists only in the checked answer: the fetch works only because it connects to that address
    assert read_source(f"http://pictures.test:{port}/good.png", timeout=5).data == GOOD_PNG
    with pytest.raises(ImageError) as e:
        read_source(f"http://pictures.test:{port}/to-loopback", timeout=5)
    message = str(e.value)
    assert message.startswith(f"http://pictures.test:{port}/to-loopback: redirected to http://127.0.0.2:{port}/good.png")
    assert "refused" in message and "non-public address 127.0.0.2" in message
    # the refusal is the guard's, not a failed connection: without the guard the redirect is followed
    with pytest.raises(ImageError, match="cannot fetch"):
        read_source(f"http://pictures.test:{port}/to-loopback", timeout=5, allow_private=True)


def test_netguard_refuses_other_schemes_and_private_ranges():
    for url, why in (("ftp://example.org/a.png", "only http and https"), ("http:///a.png", "no host"),
                     ("http://10.1.2.3/a.png", "non-public address 10.1.2.3"),
                     ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
                     ("http://[::1]:8080/a.png", "non-public address ::1")):
        with pytest.raises(netguard.FetchError, match=why):
            netguard.check_url(url)


def test_a_stalled_url_times_out_after_the_default_10_seconds(tiny_model, http_base, tmp_path, monkeypatch):
    """The promised default (10 s per URL) as the server starts it: no CLIPSEEK_URL_TIMEOUT, the index flow's
    YAML and its encoder options as `clipseek serve` builds them, the encoder they configure."""
    from flows.serving import INDEX_FLOW, flow_config

    monkeypatch.delenv("CLIPSEEK_URL_TIMEOUT", raising=False)
    settings = Settings(model=tiny_model, device="cpu", workspace=str(tmp_path))
    config = flow_config(INDEX_FLOW, host="127.0.0.1", port=free_port(), workspace=settings.workspace,
                         encoder_options={"url_timeout": settings.url_timeout,
                                          "pretrained_model_name_or_path": settings.model, "device": "cpu"})
    options = next(e.get("uses_with") or {} for e in config["executors"] if "image" in str(e.get("uses")))
    assert "url_timeout" not in options  # nothing set: the encoder's own default applies
    encoder = CLIPImageEncoder(**options, allow_private_urls=True)  # the test's HTTP server is on loopback
    try:
        t0 = time.monotonic()
        done = encoder.encode(DocList[ImageInput]([ImageInput(url=f"{http_base}/stall"),
                                                   ImageInput(url=f"{http_base}/good.png")]))
        elapsed = time.monotonic() - t0
    finally:
        encoder.close()
    assert "timed out after 10 s" in (done[0].error or ""), done[0].error
    assert 9.5 <= elapsed < 30, elapsed
    assert done[1].error is None and done[1].embedding is not None  # the other URL of the batch is embedded
