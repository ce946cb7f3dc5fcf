"""When and where a picture was taken: EXIF read through the one decode path, kept by the store, filtered."""

import datetime as dt
import io
import sqlite3

import numpy as np
import pytest
from docarray import DocList
from PIL import Image

from executors.clip_image_encoder import CLIPImageEncoder
from executors.docs import ImageInput
from executors.images.imaging import decode_image
from executors.store.vector_store import Record, VectorStore


def exif_jpeg(path=None, *, original=None, plain=None, offset=None, make="Canon", model="Canon EOS R5", gps=None,
              colour=(200, 10, 10)) -> bytes:
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    if plain:
        exif[0x0132] = plain
    sub = exif.get_ifd(0x8769)
    if original:
        sub[0x9003] = original
    if offset:
        sub[0x9011] = offset
    if gps:
        (lat, ns), (lon, ew) = gps
        ifd = exif.get_ifd(0x8825)
        ifd[1], ifd[2], ifd[3], ifd[4] = ns, lat, ew, lon
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, "JPEG", exif=exif)
    if path is not None:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    return buffer.getvalue()


def utc(*args) -> float:
    return dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp()


def test_exif_date_camera_and_place():
    facts = decode_image(exif_jpeg(original="2019:07:04 10:00:00", plain="2020:01:01 00:00:00", offset="+02:00",
                                   gps=(((52.0, 31.0, 12.0), "N"), ((13.0, 24.0, 0.0), "W"))), "a.jpg").photo_facts
    assert facts.taken == utc(2019, 7, 4, 8) and facts.taken_from == "DateTimeOriginal"  # 10:00 at +02:00
    assert facts.camera == "Canon EOS R5"  # the make is not said twice
    assert facts.latitude == pytest.approx(52.52) and facts.longitude == pytest.approx(-13.4)


def test_datetime_when_there_is_no_original_and_nothing_without_exif():
    facts = decode_image(exif_jpeg(plain="2020:01:01 00:00:00", make="NIKON", model="Z 6"), "b.jpg").photo_facts
    assert (facts.taken, facts.taken_from, facts.camera) == (utc(2020, 1, 1), "DateTime", "NIKON Z 6")
    assert facts.latitude is None
    for broken in ("2020:13:45 99:00:00", "", "    :  :     :  :  "):
        assert decode_image(exif_jpeg(original=broken), "c.jpg").photo_facts.taken is None
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    facts = decode_image(buffer.getvalue(), "d.png").photo_facts
    assert (facts.taken, facts.camera, facts.latitude) == (None, None, None)


def test_the_encoder_says_where_the_date_came_from(tiny_model, tmp_path):
    exif_jpeg(tmp_path / "dated.jpg", original="2019:07:04 10:00:00")
    exif_jpeg(tmp_path / "undated.jpg", make=None, model=None)
    docs = DocList[ImageInput]([ImageInput(url=str(tmp_path / "dated.jpg")), ImageInput(url=str(tmp_path / "undated.jpg"))])
    CLIPImageEncoder(pretrained_model_name_or_path=tiny_model, device="cpu", dtype="float32").encode(docs)
    assert (docs[0].taken, docs[0].taken_from, docs[0].camera) == (utc(2019, 7, 4, 10), "DateTimeOriginal", "Canon EOS R5")
    assert docs[1].taken == docs[1].mtime and docs[1].taken_from == "mtime" and docs[1].camera is None


def _store_with_dates(tmp_path):
    store = VectorStore(str(tmp_path / "s"))
    rng = np.random.default_rng(0)
    dates = {"winter": utc(2019, 1, 10), "summer": utc(2019, 7, 4), "autumn": utc(2019, 10, 1), "undated": None}
    store.upsert(rng.standard_normal((4, 8)).astype(np.float32),
                 [Record(id=k, uri=f"/{k}.jpg", taken=v, taken_from="DateTimeOriginal" if v else None,
                         camera="Canon EOS R5" if k != "autumn" else None) for k, v in dates.items()])
    return store


def test_the_store_keeps_and_filters_by_when_and_camera(tmp_path):
    store = _store_with_dates(tmp_path)
    assert store.get(["summer"])["summer"].taken == utc(2019, 7, 4)
    ids = lambda where: sorted(r.id for r, _ in store.search(np.ones(8), limit=10, where=where)[0])  # noqa: E731
    assert ids({"taken": {"$gte": "2019-06-01", "$lt": "2019-09-01"}}) == ["summer"]
    assert ids({"taken": {"$lt": "2019-06-01"}}) == ["winter"]
    assert ids({"taken": None}) == ["undated"]
    assert ids({"camera": "Canon EOS R5"}) == ["summer", "undated", "winter"]
    store.close()


def test_an_index_made_before_the_dates_gains_their_columns(tmp_path):
    folder = tmp_path / "old"
    VectorStore(str(folder)).close()
    db = sqlite3.connect(folder / "meta.sqlite")  # the rows table as schema version 1 first made it
    db.executescript("DROP TABLE rows; CREATE TABLE rows (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, uri TEXT, "
                     "tags TEXT NOT NULL DEFAULT '{}', content_hash TEXT, mtime REAL, size INTEGER, width INTEGER, "
                     "height INTEGER, indexed_at REAL);")
    db.close()
    store = VectorStore(str(folder))
    store.upsert(np.ones((1, 8), np.float32), [Record(id="a", uri="/a.jpg", taken=utc(2019, 7, 4))])
    assert store.get(["a"])["a"].taken == utc(2019, 7, 4)
    store.close()
