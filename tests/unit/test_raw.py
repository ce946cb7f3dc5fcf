"""Camera RAW (CR2, CR3, NEF, ARW, DNG, RAF, ORF, RW2): indexed by the JPEG preview it embeds, never demosaiced.

The RAW files are DNGs written by tests/camera_raw.py (a Bayer mosaic, a tiny RGB thumbnail, a JPEG preview),
which LibRaw opens as it opens a camera's.
"""

import datetime as dt
import io

import numpy as np
import pytest
from docarray import DocList
from PIL import Image

from clipseek.client import expand_sources
from executors.clip_image_encoder import CLIPImageEncoder, prepare
from executors.docs import STATUS_FAILED, ImageInput
from executors.images.imaging import IMAGE_EXTENSIONS, ImageError, Preprocess, decode_image, is_image_file
from executors.images.raw import RAW_EXTENSIONS, camera_raw_preview, raw_kind
from tests.camera_raw import dng_bytes, drawn_picture, preview_jpeg, write_dng

RED, DARK = (220, 30, 30), (20, 20, 20)
TAKEN = "2021:07:14 09:30:00"
TAKEN_EPOCH = dt.datetime(2021, 7, 14, 9, 30, tzinfo=dt.timezone.utc).timestamp()
NO_PREVIEW = "no embedded preview clipseek can read"


def _near(pixel, colour, tolerance=30):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour))


def _prepare(doc, draft):
    """What the encoder makes of one document: (pixels, width, height, source info)."""
    return prepare(doc, Preprocess(), url_timeout=5, max_bytes=2**20, draft=draft)[:4]


def _dng(size=(320, 240), taken=TAKEN, **kw) -> bytes:
    return dng_bytes(preview_jpeg(drawn_picture(size), taken=taken), **kw)


def test_the_preview_is_what_gets_decoded():
    img = decode_image(_dng(), "photo.dng")
    assert img.mode == "RGB" and img.size == (320, 240)  # the preview, not the 16x12 thumbnail or the 64x48 mosaic
    assert _near(img.getpixel((160, 120)), RED)  # the disc drawn in the preview
    assert _near(img.getpixel((160, 5)), DARK)  # its dark bar along the top: upright
    assert _near(img.getpixel((10, 120)), (250, 250, 250))


def test_the_previews_exif_and_the_raws_camera_are_read():
    facts = decode_image(_dng(), "photo.dng").photo_facts
    assert facts.taken == TAKEN_EPOCH and facts.taken_from == "DateTimeOriginal"
    assert facts.camera == "Clipseek Test Camera"  # Make and Model from the RAW's IFD0
    facts = decode_image(dng_bytes(preview_jpeg(drawn_picture(), gps=(48.8584, -2.2945))), "gps.dng").photo_facts
    assert facts.latitude == pytest.approx(48.8584, abs=1e-5) and facts.longitude == pytest.approx(-2.2945, abs=1e-5)


def test_a_raw_without_dates_gets_none_and_the_raws_own_date_stands_in():
    assert decode_image(_dng(taken=None), "photo.dng").photo_facts.taken is None  # never 1970
    facts = decode_image(_dng(taken=None, date_time="2019:05:06 07:08:09"), "photo.dng").photo_facts
    assert facts.taken_from == "DateTime"
    assert facts.taken == dt.datetime(2019, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc).timestamp()


def test_the_raws_orientation_turns_the_preview():
    img = decode_image(_dng(orientation=6), "portrait.dng")  # 6: turn 90 degrees clockwise to show
    assert img.size == (240, 320)
    assert _near(img.getpixel((234, 160)), DARK) and _near(img.getpixel((120, 160)), RED)  # the bar is now right


def test_a_previews_own_orientation_wins_over_an_upright_raw():
    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    drawn_picture().save(buf, "JPEG", quality=92, exif=exif.tobytes())
    img = decode_image(dng_bytes(buf.getvalue()), "turned.dng")
    assert img.size == (320, 240) and _near(img.getpixel((160, 234)), DARK)  # turned 180: the bar at the bottom


def test_bytes_without_a_name_are_recognised_by_content():
    data = _dng()
    assert raw_kind(data) == "DNG"
    assert decode_image(data).size == (320, 240)
    pixels, width, height, info = _prepare(ImageInput(bytes_=data), draft=True)
    assert pixels.shape == (3, 224, 224) and (width, height) == (320, 240)
    assert info.facts.taken == TAKEN_EPOCH


def test_a_raw_read_from_a_path_or_url(tmp_path):
    path = write_dng(tmp_path / "IMG_0001.DNG", drawn_picture(), taken=TAKEN)
    for url in (path, "file://" + path):
        _, width, height, info = _prepare(ImageInput(url=url), draft=False)
        assert (width, height) == (320, 240) and info.facts.taken == TAKEN_EPOCH


def test_size_limits_apply_to_the_preview():
    data = _dng(size=(1600, 1200))
    img = decode_image(data, "big.dng", max_megapixels=0.5)  # a JPEG preview: decoded at a reduced scale
    assert img.size == (800, 600) and img.original_size == (1600, 1200)
    assert decode_image(data, "big.dng", draft_size=400).size == (800, 600)


def test_the_decompression_guard_applies_to_the_preview(monkeypatch):
    files = (_dng(), dng_bytes(None, thumbnail=(240, 180)))  # a JPEG preview, a bitmap thumbnail
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # refused above 20,000 pixels
    for data in files:
        with pytest.raises(ImageError, match="^big.dng: "):
            decode_image(data, "big.dng")


def test_a_bitmap_thumbnail_becomes_the_picture():
    data = dng_bytes(None, thumbnail=(96, 64), thumbnail_colour=(10, 200, 30), orientation=3,
                     date_time="2019:05:06 07:08:09")
    img = decode_image(data, "old.dng")
    assert img.size == (96, 64) and _near(img.getpixel((48, 32)), (10, 200, 30), 2)
    assert img.photo_facts.taken_from == "DateTime"


@pytest.mark.parametrize("case", ["no preview", "icon only", "truncated preview", "truncated file", "header only",
                                  "garbage"])
def test_a_raw_without_a_usable_preview_names_the_file(case):
    whole = _dng()
    data = {
        "no preview": dng_bytes(None, thumbnail=None),
        "icon only": dng_bytes(None),  # a 16x12 thumbnail is not a picture
        "truncated preview": whole[:-500],
        "truncated file": whole[: len(whole) // 2],
        "header only": whole[:600],
        "garbage": b"II*\0" + bytes(range(256)) * 4,
    }[case]
    for name in ("/photos/IMG_1234.DNG", "image"):
        if case == "garbage" and name == "image":
            continue  # without a RAW's name or structure, garbage is just an unknown format
        with pytest.raises(ImageError) as err:
            decode_image(data, name)
        assert str(err.value).startswith(f"{name}: ") and NO_PREVIEW in str(err.value), str(err.value)


@pytest.mark.parametrize("name,head", [("a.cr3", b"\0\0\0\x18ftypcrx \0\0\0\1"), ("a.raf", b"FUJIFILMCCD-RAW 0201"),
                                       ("a.orf", b"IIRO\x08\0\0\0"), ("a.rw2", b"IIU\0\x08\0\0\0"),
                                       ("a.cr2", b"II*\0\x10\0\0\0CR\x02\0")])
def test_other_raw_formats_are_recognised_and_a_broken_one_reported(name, head):
    assert raw_kind(head + bytes(64)) is not None
    with pytest.raises(ImageError, match=f"^{name}: is a camera RAW .*{NO_PREVIEW}"):
        decode_image(head + bytes(64), name)


def test_pictures_are_not_mistaken_for_raws():
    buf = io.BytesIO()
    drawn_picture().save(buf, "TIFF")
    tiff = buf.getvalue()
    assert raw_kind(tiff) is None and camera_raw_preview(tiff, "scan.tif") is tiff
    assert decode_image(tiff, "scan.tif").size == (320, 240)
    jpeg = preview_jpeg(drawn_picture())
    assert decode_image(jpeg, "misnamed.nef").size == (320, 240)  # a JPEG is a JPEG whatever its name


def test_raw_extensions_are_image_files(tmp_path):
    assert set(RAW_EXTENSIONS) <= set(IMAGE_EXTENSIONS)
    for ext in (".cr2", ".CR3", ".nef", ".ARW", ".dng", ".raf", ".ORF", ".rw2"):
        assert is_image_file("/photos/IMG_0001" + ext)
        ImageInput(url="/photos/IMG_0001" + ext)  # docarray takes them as image URLs


def test_a_folder_with_raws_and_jpegs_expands_to_all_of_them(tmp_path):
    (tmp_path / "sub").mkdir()
    names = ["a.dng", "b.JPG", "c.NEF", "sub/d.cr3", "sub/e.arw", "sub/f.jpeg", "g.RAF", "h.orf", "i.rw2", "j.cr2"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.xmp").write_text("<x:xmpmeta/>")  # a sidecar is not a picture
    assert sorted(expand_sources([str(tmp_path)])) == sorted(str(tmp_path / n) for n in names)
    assert expand_sources([str(tmp_path / "*.dng")]) == [str(tmp_path / "a.dng")]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, dtype="float32")


def test_a_broken_raw_fails_alone_and_the_batch_is_indexed(encoder, tmp_path):
    good = write_dng(tmp_path / "good.dng", drawn_picture(), taken=TAKEN)
    broken = tmp_path / "broken.nef"
    broken.write_bytes(_dng()[:700])
    jpeg = tmp_path / "same.jpg"
    drawn_picture().save(jpeg, quality=92)
    docs = DocList[ImageInput]([ImageInput(url=good), ImageInput(url=str(broken)), ImageInput(url=str(jpeg)),
                                ImageInput(bytes_=_dng())])
    encoder.encode(docs)
    assert docs[1].status == STATUS_FAILED and str(broken) in docs[1].error and NO_PREVIEW in docs[1].error
    for doc in (docs[0], docs[2], docs[3]):
        assert doc.error is None and doc.embedding is not None and (doc.width, doc.height) == (320, 240)
    assert docs[0].taken == TAKEN_EPOCH and docs[0].camera == "Clipseek Test Camera"
    # the RAW embeds as the JPEG of the same picture does
    assert float(np.dot(docs[0].embedding, docs[2].embedding)) > 0.999
