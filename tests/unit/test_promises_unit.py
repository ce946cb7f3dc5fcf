"""What the README promises, without a server: the client's split of index requests by image bytes, and
WebP, BMP and TIFF decoding to the same picture as a PNG of it."""

import io

import numpy as np
import pytest
from docarray import DocList
from PIL import Image

import clipseek.client as client_module
from clipseek.client import ClipseekClient, _split_by_bytes
from executors.docs import STATUS_INDEXED, ImageInput
from executors.images.imaging import decode_image, is_image_file


def _docs(sizes):
    return DocList[ImageInput]([ImageInput(id=f"d{i}", uri=f"d{i}", bytes_=b"x" * n) if n is not None
                                else ImageInput(id=f"d{i}", uri=f"http://pictures.example/{i}.png")
                                for i, n in enumerate(sizes)])


def test_the_split_stays_under_the_cap_in_order():
    docs = _docs([40, 40, 30, 100, 150, 10, None, 60, 40])
    parts = [[d.id for d in p] for p in _split_by_bytes(docs, 100)]
    # consecutive, each under 100 bytes of images, except a picture over the cap, which goes alone
    assert parts == [["d0", "d1"], ["d2"], ["d3"], ["d4"], ["d5", "d6", "d7"], ["d8"]]
    assert [d for p in parts for d in p] == [d.id for d in docs]
    assert [[d.id for d in p] for p in _split_by_bytes(_docs([None] * 5), 1)] == [["d0", "d1", "d2", "d3", "d4"]]
    assert list(_split_by_bytes(_docs([]), 100)) == []


def test_the_cap_is_64_mib():
    assert client_module.MAX_REQUEST_BYTES == 64 * 2**20


def test_index_sends_the_bytes_in_requests_under_the_cap(tmp_path, monkeypatch):
    """A client that sends the bytes (a remote server) splits one batch into requests under MAX_REQUEST_BYTES."""
    sizes = []
    for i, (w, h) in enumerate([(200, 150), (180, 120), (220, 160), (90, 90), (240, 180)]):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
        sizes.append((tmp_path / f"p{i}.png").stat().st_size)
    cap = max(sizes) + min(sizes) - 1  # at most two pictures in one request, never three
    monkeypatch.setattr(client_module, "MAX_REQUEST_BYTES", cap)
    client = ClipseekClient("grpc://127.0.0.1:1", "grpc://127.0.0.1:2", send_bytes=True)
    sent = []

    def post(address, endpoint, docs, return_type, parameters=None, target_executor=None):
        assert endpoint == "/index"
        sent.append([(d.uri, len(d.bytes_), d.url) for d in docs])
        for d in docs:
            d.status = STATUS_INDEXED
        return docs

    monkeypatch.setattr(client, "_post", post)
    report = client.index([str(tmp_path)], force=True, batch_size=256)
    paths = sorted(str(tmp_path / f"p{i}.png") for i in range(5))
    assert sorted(report.indexed) == paths and not report.failed
    assert len(sent) >= 3  # one batch of five, in several requests
    assert all(sum(n for _, n, _ in part) <= cap for part in sent), sent
    assert [uri for part in sent for uri, _, _ in part] == paths  # each once, in order
    assert all(url is None for part in sent for _, _, url in part)  # bytes, not a path for the server to read
    assert sorted(n for part in sent for _, n, _ in part) == sorted(sizes)


def _picture():
    """A noisy picture with sharp edges: any change of a pixel shows."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    arr[5:20, 10:40] = (200, 30, 30)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt,ext,options", [("WEBP", ".webp", {"lossless": True}), ("BMP", ".bmp", {}),
                                             ("TIFF", ".tif", {}), ("TIFF", ".tiff", {"compression": "tiff_lzw"})])
def test_webp_bmp_tiff_decode_to_the_picture_of_the_png(fmt, ext, options):
    picture = _picture()
    png, other = io.BytesIO(), io.BytesIO()
    picture.save(png, "PNG")
    picture.save(other, fmt, **options)
    assert Image.open(io.BytesIO(other.getvalue())).format == fmt  # really that container
    from_png = decode_image(png.getvalue(), "p.png")
    decoded = decode_image(other.getvalue(), f"p{ext}")
    assert decoded.mode == "RGB" and decoded.size == from_png.size == (53, 37)
    assert np.array_equal(np.asarray(decoded), np.asarray(from_png))
    assert np.array_equal(np.asarray(decoded), np.asarray(picture))
    assert is_image_file(f"holiday/IMG_1{ext}") and is_image_file(f"holiday/IMG_1{ext.upper()}")  # index walks them


def test_lossy_webp_decodes_close_to_the_png():
    picture = Image.new("RGB", (64, 48), (30, 140, 200))
    picture.paste((240, 200, 20), (10, 10, 40, 30))
    webp = io.BytesIO()
    picture.save(webp, "WEBP", quality=90)
    decoded = np.asarray(decode_image(webp.getvalue(), "p.webp"), dtype=np.int16)
    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded - np.asarray(picture, dtype=np.int16)).mean() < 4
