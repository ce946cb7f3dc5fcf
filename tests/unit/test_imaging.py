"""imaging: read_source / decode_image / preprocess / array_to_image as pure functions."""

import base64
import hashlib
import io
import os
import re
import socket
import threading
import tracemalloc
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from executors.images.imaging import (
    ImageError,
    Preprocess,
    array_to_image,
    decode_image,
    preprocess,
    read_source,
    to_rgb,
    uri_id,
)

from tests.conftest import call_within


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content plus noise, so resampling differences would show
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], axis=-1)
    img = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


# ---- preprocess vs transformers -----------------------------------------------------------

PROCESSOR_CONFIGS = {
    "default-224": {},
    "small-32": {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
    # crop larger than the resized image: padded, odd pad amounts on both axes
    "pad-31-to-32": {"size": {"shortest_edge": 31}, "crop_size": {"height": 32, "width": 32}},
    "pad-30-to-33x35": {"size": {"shortest_edge": 30}, "crop_size": {"height": 33, "width": 35}},
}
IMAGE_SIZES = [(300, 200), (200, 300), (256, 256), (224, 224), (20, 13), (7, 40), (33, 32)]


@pytest.fixture(scope="module")
def processors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import CLIPImageProcessor

        return {name: CLIPImageProcessor(**kw) for name, kw in PROCESSOR_CONFIGS.items()}


@pytest.mark.parametrize("config", list(PROCESSOR_CONFIGS))
def test_preprocess_matches_clip_image_processor(processors, config):
    proc = processors[config]
    recipe = Preprocess.from_processor_config(proc.to_dict())
    if config == "default-224":
        assert recipe == Preprocess()
    for i, size in enumerate(IMAGE_SIZES):
        img = noise(*size, seed=i)
        want = proc(images=img, return_tensors="np")["pixel_values"][0]
        got = preprocess(img, recipe)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        assert got.shape == want.shape == (3, recipe.crop_height, recipe.crop_width)
        diff = float(np.abs(got - want).max())
        assert diff < 1e-4, f"{config} {size}: max abs difference {diff}"


SIGLIP_CONFIGS = {
    "default-224": {},
    "square-32": {"size": {"height": 32, "width": 32}},
    "wide-24x40": {"size": {"height": 24, "width": 40}},
}


@pytest.fixture(scope="module")
def siglip_processors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import SiglipImageProcessor  # without torchvision: SiglipImageProcessorPil

        return {name: SiglipImageProcessor(**kw) for name, kw in SIGLIP_CONFIGS.items()}


@pytest.mark.parametrize("config", list(SIGLIP_CONFIGS))
def test_preprocess_matches_siglip_image_processor(siglip_processors, config):
    """SigLIP resizes to exactly height x width (aspect ratio not kept, no crop), mean and std 0.5."""
    proc = siglip_processors[config]
    recipe = Preprocess.from_processor_config(proc.to_dict())
    size = proc.to_dict()["size"]
    assert recipe.exact_resize and (recipe.resize_height, recipe.resize_width) == (size["height"], size["width"])
    assert recipe.shortest_edge == max(size["height"], size["width"])  # the draft-decoding target
    for i, image_size in enumerate(IMAGE_SIZES):
        img = noise(*image_size, seed=i)
        want = proc(images=img, return_tensors="np")["pixel_values"][0]
        got = preprocess(img, recipe)
        assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
        assert got.shape == want.shape == (3, size["height"], size["width"])
        diff = float(np.abs(got - want).max())
        assert diff < 1e-4, f"{config} {image_size}: max abs difference {diff}"


def test_exact_resize_crops_only_when_the_processor_does():
    r = Preprocess.from_processor_config({"size": {"height": 40, "width": 60}, "do_center_crop": True,
                                          "crop_size": {"height": 32, "width": 48}})
    assert (r.resize_height, r.resize_width, r.crop_height, r.crop_width) == (40, 60, 32, 48)
    assert preprocess(noise(100, 30), r).shape == (3, 32, 48)
    r = Preprocess.from_processor_config({"size": {"height": 40, "width": 60}, "do_center_crop": False,
                                          "crop_size": {"height": 32, "width": 48}})
    assert (r.crop_height, r.crop_width) == (40, 60)
    assert preprocess(noise(100, 30), r).shape == (3, 40, 60)
    clip = Preprocess.from_processor_config({"size": {"shortest_edge": 40}, "crop_size": {"height": 40, "width": 40}})
    assert not clip.exact_resize


def test_decode_draft_for_an_exact_resize_recipe_covers_both_sides():
    recipe = Preprocess.from_processor_config({"size": {"height": 24, "width": 100}})
    img = decode_image(encode(noise(1600, 400), "JPEG"), draft_size=recipe.shortest_edge * 2)
    assert img.size[0] < 1600 and min(img.size) >= 200  # reduced, still at least twice the target on both sides
    assert img.original_size == (1600, 400)
    assert preprocess(img, recipe).shape == (3, 24, 100)


def test_from_processor_config_variants():
    r = Preprocess.from_processor_config({"size": 64, "crop_size": 48, "image_mean": [0.5] * 3,
                                          "image_std": [0.25] * 3, "resample": 2, "rescale_factor": 0.5})
    assert (r.shortest_edge, r.crop_height, r.crop_width, r.resample, r.rescale_factor) == (64, 48, 48, 2, 0.5)
    assert tuple(r.mean) == (0.5,) * 3 and tuple(r.std) == (0.25,) * 3
    r = Preprocess.from_processor_config({"size": {"height": 40, "width": 40}})
    assert (r.shortest_edge, r.crop_height, r.crop_width) == (40, 40, 40)


def test_preprocess_normalizes_known_colour():
    recipe = Preprocess(shortest_edge=8, crop_height=8, crop_width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    out = preprocess(Image.new("RGB", (16, 8), (255, 0, 51)), recipe)
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], -2.0, atol=1e-6)
    np.testing.assert_allclose(out[2], (0.2 - 0.5) / 0.5, atol=1e-6)


# ---- read_source ------------------------------------------------------------------------------


def test_read_local_path_and_file_uri(tmp_path):
    data = encode(noise(10, 10))
    p = tmp_path / "a b%.png"
    p.write_bytes(data)
    info = read_source(str(p))
    assert info.data == data and info.uri == str(p)
    assert info.size == len(data) and info.mtime == pytest.approx(os.stat(p).st_mtime)
    assert info.content_hash == hashlib.sha256(data).hexdigest()
    uri = p.as_uri()
    assert "%20" in uri
    info = read_source(uri)
    assert info.data == data and info.uri == uri


def test_read_data_uri():
    data = encode(noise(4, 4))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    info = read_source(uri)
    assert info.data == data and info.size == len(data)
    assert info.uri == uri[:64]
    assert read_source("data:text/plain,hello%20there").data == b"hello there"
    with pytest.raises(ImageError, match="base64"):
        read_source("data:image/png;base64,***not base64***")
    with pytest.raises(ImageError, match="separator"):
        read_source("data:image/png;base64")


def test_read_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageError) as e:
        read_source(missing)
    assert missing in str(e.value) and "no such file" in str(e.value)
    with pytest.raises(ImageError, match="directory"):
        read_source(str(tmp_path))
    with pytest.raises(ImageError, match="no such file"):
        read_source("file://" + missing)


def test_read_size_cap(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(b"x" * 1000)
    with pytest.raises(ImageError, match="cap"):
        read_source(str(p), max_bytes=999)
    assert len(read_source(str(p), max_bytes=1000).data) == 1000


def _read_within(seconds, *args, **kwargs):
    """read_source(*args, **kwargs) in a thread: (finished, result or exception)."""
    return call_within(seconds, read_source, *args, **kwargs)


def _unblock(fifo) -> None:
    """Give a reader blocked on opening ``fifo`` its end of file."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass


def test_read_refuses_a_named_pipe_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        for source, roots in ((str(fifo), None), (fifo.as_uri(), None), (str(fifo), [str(tmp_path)])):
            finished, result = _read_within(10, source, allowed_roots=roots)
            assert finished, "reading a named pipe blocked"
            assert isinstance(result, ImageError), result
            assert str(result) == f"{source}: is a named pipe (FIFO), not a regular file"
        link = tmp_path / "link.jpg"  # a symlink to the pipe is the pipe
        link.symlink_to(fifo)
        finished, result = _read_within(10, str(link))
        assert finished and isinstance(result, ImageError) and "named pipe" in str(result)
    finally:
        _unblock(fifo)


def test_read_refuses_devices():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(ImageError, match=r"^/dev/null: is a character device, not a regular file$"):
        read_source("/dev/null")
    with pytest.raises(ImageError, match="character device"):
        read_source("/dev/zero", max_bytes=10)  # would never end


def test_read_stops_past_the_cap_whatever_the_size_says():
    """A file in /proc reports a size of 0: the cap holds on what is read, not on what stat says."""
    status = "/proc/self/status"
    if not os.path.exists(status) or os.stat(status).st_size != 0:
        pytest.skip("no /proc/self/status that reports size 0")
    with pytest.raises(ImageError, match=r"^/proc/self/status: file is over the 100-byte cap"):
        read_source(status, max_bytes=100)
    assert len(read_source(status, max_bytes=1 << 20).data) > 100  # under the cap it is read whole


def test_read_checks_the_roots_on_the_file_it_opens(tmp_path, monkeypatch):
    """A folder swapped for a symlink out of the root between the check and the read is caught on the
    file that was opened."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    inside_pic, secret = root / "sub" / "a.png", outside / "sub" / "a.png"
    inside_pic.write_bytes(encode(noise(8, 8, seed=1)))
    secret.write_bytes(encode(noise(8, 8, seed=2)))
    assert read_source(str(inside_pic), allowed_roots=[str(root)]).data == inside_pic.read_bytes()

    real_realpath, swapped = os.path.realpath, []

    def realpath_then_swap(path, *args, **kwargs):
        result = real_realpath(path, *args, **kwargs)
        if not swapped and os.fspath(path) == str(inside_pic):
            swapped.append(True)
            os.rename(root / "sub", root / "sub-before")
            os.symlink(outside / "sub", root / "sub")
        return result

    monkeypatch.setattr(os.path, "realpath", realpath_then_swap)
    with pytest.raises(ImageError, match="refused: the path is outside the folders this server may read"):
        read_source(str(inside_pic), allowed_roots=[str(root)])
    assert swapped


def test_unsupported_scheme():
    with pytest.raises(ImageError) as e:
        read_source("ftp://127.0.0.1/x.png")
    assert "ftp" in str(e.value) and "unsupported" in str(e.value)


PNG_BYTES = encode(noise(12, 9))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {
            "/img.png": (200, "image/png", PNG_BYTES),
            "/raw": (200, "application/octet-stream", PNG_BYTES),
            "/page": (200, "text/html; charset=utf-8", b"<html>hi</html>"),
            "/big": (200, "image/png", b"y" * 5000),
        }
        status, ctype, body = routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_read_http(http_base, no_proxy):
    info = read_source(f"{http_base}/img.png", timeout=5, allow_private=True)
    assert info.data == PNG_BYTES and info.uri == f"{http_base}/img.png"
    assert decode_image(info.data).size == (12, 9)
    assert read_source(f"{http_base}/raw", timeout=5, allow_private=True).data == PNG_BYTES


def test_read_http_errors(http_base, no_proxy):
    with pytest.raises(ImageError) as e:
        read_source(f"{http_base}/missing.png", timeout=5, allow_private=True)
    assert "404" in str(e.value) and "/missing.png" in str(e.value)
    with pytest.raises(ImageError) as e:
        read_source(f"{http_base}/page", timeout=5, allow_private=True)
    assert "text/html" in str(e.value) and "not an image" in str(e.value)
    with pytest.raises(ImageError, match="cap"):
        read_source(f"{http_base}/big", timeout=5, max_bytes=4000, allow_private=True)


def test_read_http_connection_refused(no_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot fetch"):
        read_source(f"http://127.0.0.1:{port}/x.png", timeout=5, allow_private=True)


# ---- decode_image --------------------------------------------------------------------------------


def test_decode_refuses_non_images():
    with pytest.raises(ImageError, match=r"empty\.png: empty"):
        decode_image(b"", "empty.png")
    with pytest.raises(ImageError, match=r"noise\.jpg: not a recognised"):
        decode_image(np.random.default_rng(0).bytes(2000), "noise.jpg")
    png = encode(noise(64, 64))
    with pytest.raises(ImageError, match=r"cut\.png"):
        decode_image(png[: len(png) // 2], "cut.png")


def test_decode_modes_come_out_rgb():
    gray = Image.fromarray(np.full((5, 6), 77, np.uint8), "L")
    out = decode_image(encode(gray), "g")
    assert out.mode == "RGB" and out.size == (6, 5)
    assert out.getpixel((2, 2)) == (77, 77, 77)

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    out = decode_image(encode(rgba), "rgba")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((3, 3), 1)
    data = encode(pal, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, "pal")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == (200, 0, 0)


def test_decode_16_bit_png():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, "deep")
    assert out.mode == "RGB" and out.size == (3, 1)
    px = [out.getpixel((x, 0)) for x in range(3)]
    assert px[0] == (0, 0, 0) and px[2] == (255, 255, 255)
    assert all(c in (127, 128) for c in px[1])
    # 16-bit data that only uses the low 8 bits keeps its values
    low = decode_image(encode(Image.fromarray(np.array([[10, 200]], dtype=np.uint16))), "low")
    assert [low.getpixel((x, 0))[0] for x in range(2)] == [10, 200]


def test_16_bit_pictures_become_8_bit_without_a_float_copy():
    """Decoding runs on up to 8 threads at once: a 16-bit picture costs about a byte per pixel more, not 16."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 65536, (1000, 2000), dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    tracemalloc.start()
    try:
        out = to_rgb(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * arr.size, f"converting {arr.size} pixels held {peak} bytes"
    assert out.mode == "RGB" and out.size == (2000, 1000)
    np.testing.assert_array_equal(np.asarray(out)[..., 1], (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8))

    # 32-bit values beyond the 16-bit range scale by the picture's maximum; negative ones are black
    wide = np.array([[-5, 0, 500_000, 1_000_000]], dtype=np.int32)
    assert [p[0] for p in to_rgb(Image.fromarray(wide, "I")).getdata()] == [0, 0, 127, 255]


def test_the_stated_pixel_ceiling_is_the_real_one(monkeypatch):
    """Pillow refuses above twice MAX_IMAGE_PIXELS: the error says that number, and a picture of exactly that
    many pixels is decoded."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as e:
        decode_image(encode(Image.new("L", (3, 667))), "big.png")  # 2001 pixels
    message = str(e.value)
    stated = int(re.search(r"over (\d+) pixels", message).group(1))
    assert stated == 2000 and message.startswith("big.png: image too large") and "--max-megapixels" in message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert decode_image(encode(Image.new("L", (40, 50))), "edge.png").size == (40, 50)  # exactly 2000


def test_the_megapixel_limit_names_its_serve_flag():
    png = encode(Image.new("RGB", (1500, 1000)))
    with pytest.raises(ImageError, match=r"^wide\.png: 1500x1000 is 1\.5 megapixels, over the limit of 1 "
                                         r"\(clipseek serve --max-megapixels\)$"):
        decode_image(png, "wide.png", max_megapixels=1)


def test_decode_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, "cmyk")
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_decode_applies_exif_rotation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(img, "JPEG", exif=exif, quality=95)
    out = decode_image(data, "rot")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_decode_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, "anim")
    assert out.mode == "RGB" and out.size == (8, 8)
    assert out.getpixel((4, 4)) == (255, 0, 0)


def test_decode_jpeg_draft():
    data = encode(noise(800, 600), "JPEG")
    assert decode_image(data).size == (800, 600)
    small = decode_image(data, draft_size=100)
    assert small.mode == "RGB"
    assert min(small.size) >= 100 and small.size[0] < 800


# ---- array_to_image ----------------------------------------------------------------------------


def test_array_to_image():
    rng = np.random.default_rng(3)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = array_to_image(hwc)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), hwc)

    chw = rng.random((3, 6, 9)).astype(np.float32)
    img = array_to_image(chw)
    assert img.size == (9, 6)
    np.testing.assert_array_equal(np.asarray(img), np.rint(chw.transpose(1, 2, 0) * 255).astype(np.uint8))

    gray = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    img = array_to_image(gray)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (4, 5, 3)
    assert all(np.array_equal(arr[..., c], gray) for c in range(3))

    rgba = rng.integers(0, 256, (3, 3, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(array_to_image(rgba)), rgba[..., :3])

    with pytest.raises(ImageError, match=r"\(2, 3, 4, 5\)"):
        array_to_image(np.zeros((2, 3, 4, 5)))


# ---- ids ----------------------------------------------------------------------------------------


def test_uri_id_stable_and_distinct():
    a = uri_id("/pics/cat.jpg")
    assert a == uri_id("/pics/cat.jpg")
    assert len(a) == 20 and all(c in "0123456789abcdef" for c in a)
    others = {uri_id(u) for u in ("/pics/cat.jpg", "/pics/cat.jpeg", "file:///pics/cat.jpg", "/pics/Cat.jpg", "")}
    assert len(others) == 5
    assert uri_id("/pics/caf\udce9.jpg") != uri_id("/pics/cafe.jpg")  # undecodable file names still work
