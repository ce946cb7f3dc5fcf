"""Camera RAW files for tests, written from scratch: a minimal DNG (a TIFF with a small Bayer mosaic in a
sub-IFD) that LibRaw opens, with or without an embedded JPEG preview.

    python -m tests.camera_raw OUT.dng    # a 320x240 DNG whose preview is a red disc on white

The layout follows a camera's DNG: IFD0 holds a tiny uncompressed RGB thumbnail and the camera's tags
(Make, Model, Orientation, DateTime, DNGVersion, a colour matrix), its SubIFDs the raw mosaic
(NewSubFileType 0, CFA photometric) and the preview (NewSubFileType 1, JPEG compression).
"""

from __future__ import annotations

import io
import struct
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# TIFF field types
BYTE, ASCII, SHORT, LONG, RATIONAL, UNDEFINED, SRATIONAL = 1, 2, 3, 4, 5, 7, 10
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, UNDEFINED: 1, SRATIONAL: 8}
_FORMATS = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", UNDEFINED: "B"}


def _pack(kind: int, values) -> bytes:
    if kind == ASCII:
        return values.encode("ascii") + b"\0"
    if isinstance(values, (bytes, bytearray)):
        return bytes(values)
    if not isinstance(values, (list, tuple)):
        values = [values]
    if kind in (RATIONAL, SRATIONAL):
        code = "i" if kind == SRATIONAL else "I"
        return b"".join(struct.pack("<" + code * 2, n, d) for n, d in values)
    return struct.pack("<%d%s" % (len(values), _FORMATS[kind]), *values)


class _Tiff:
    """A little-endian TIFF laid out as cameras write one: the IFDs first (in ``room`` bytes after the
    header), the pixel data after them, so a file cut short loses pixels, not its structure."""

    def __init__(self, room: int = 0):
        self.head = bytearray(b"II*\0\0\0\0\0")
        self.data = bytearray()
        self.room = room

    def blob(self, data: bytes) -> int:
        """Add pixel data; returns its offset in the file."""
        if len(self.data) % 2:
            self.data += b"\0"
        offset = 8 + self.room + len(self.data)
        self.data += data
        return offset

    def ifd(self, entries: Sequence[Tuple[int, int, object]], next_ifd: int = 0) -> int:
        """Write an IFD of (tag, type, value) entries; returns its offset."""
        entries = sorted(entries, key=lambda e: e[0])
        start = len(self.head)
        extra_at = start + 2 + 12 * len(entries) + 4
        head, extra = bytearray(struct.pack("<H", len(entries))), bytearray()
        for tag, kind, value in entries:
            data = _pack(kind, value)
            count = len(data) // _SIZES[kind]
            if len(data) <= 4:
                field = data.ljust(4, b"\0")
            else:
                field = struct.pack("<I", extra_at + len(extra))
                extra += data + (b"\0" if len(data) % 2 else b"")
            head += struct.pack("<HHI", tag, kind, count) + field
        head += struct.pack("<I", next_ifd)
        self.head += head + extra
        return start

    def finish(self, first_ifd: int) -> bytes:
        assert len(self.head) <= 8 + self.room, "the IFDs outgrew their room"
        self.head[4:8] = struct.pack("<I", first_ifd)
        return bytes(self.head.ljust(8 + self.room, b"\0") + self.data)


def drawn_picture(size=(320, 240), colour=(220, 30, 30), background=(250, 250, 250)) -> Image.Image:
    """A disc of ``colour`` on ``background`` with a dark bar along the top edge (so a turn shows)."""
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    d.rectangle((0, 0, w - 1, max(1, h // 12)), fill=(20, 20, 20))
    return img


def preview_jpeg(img: Image.Image, *, taken: Optional[str] = None, gps: Optional[Tuple[float, float]] = None,
                 quality: int = 92) -> bytes:
    """``img`` as a baseline JPEG; ``taken`` ("YYYY:MM:DD HH:MM:SS") goes into its EXIF DateTimeOriginal,
    ``gps`` (latitude, longitude in degrees) into its GPS IFD."""
    buf = io.BytesIO()
    kw = {}
    if taken or gps:
        exif = Image.Exif()
        if taken:
            exif.get_ifd(0x8769)[0x9003] = taken
        if gps:
            exif.get_ifd(0x8825).update({1: "N" if gps[0] >= 0 else "S", 2: _degrees(gps[0]),
                                         3: "E" if gps[1] >= 0 else "W", 4: _degrees(gps[1])})
        kw["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _degrees(value: float):
    from PIL.TiffImagePlugin import IFDRational

    value = abs(value)
    minutes = (value - int(value)) * 60
    return (IFDRational(int(value), 1), IFDRational(int(minutes), 1),
            IFDRational(round((minutes - int(minutes)) * 60 * 100), 100))


def dng_bytes(preview: Optional[bytes] = None, *, preview_size: Optional[Tuple[int, int]] = None,
              orientation: int = 1, raw_size=(64, 48), make: str = "Clipseek", model: str = "Test Camera",
              date_time: Optional[str] = None, thumbnail: Optional[Tuple[int, int]] = (16, 12),
              thumbnail_colour=(128, 128, 128)) -> bytes:
    """A DNG: a 16-bit RGGB mosaic of ``raw_size`` and, if ``preview`` (JPEG bytes) is given, that preview
    (``preview_size`` its width and height, read from the JPEG when omitted), stored last in the file.
    ``orientation`` is the camera's EXIF orientation in IFD0, ``date_time`` its DateTime; ``thumbnail``
    (width, height; None for none) is the uncompressed RGB thumbnail in IFD0 that real DNGs carry, filled
    with ``thumbnail_colour``."""
    probe = _Tiff()
    _write_dng(probe, preview, preview_size, orientation, raw_size, make, model, date_time, thumbnail,
               thumbnail_colour)
    tiff = _Tiff(room=len(probe.head) - 8)
    first = _write_dng(tiff, preview, preview_size, orientation, raw_size, make, model, date_time, thumbnail,
                       thumbnail_colour)
    return tiff.finish(first)


def _write_dng(tiff: _Tiff, preview, preview_size, orientation, raw_size, make, model, date_time, thumbnail,
               thumbnail_colour) -> int:
    w, h = raw_size
    rng = np.random.default_rng(0)
    mosaic = rng.integers(200, 3800, (h, w), dtype=np.uint16)
    raw_at = tiff.blob(mosaic.astype("<u2").tobytes())
    raw_ifd = [
        (254, LONG, 0), (256, LONG, w), (257, LONG, h), (258, SHORT, 16), (259, SHORT, 1), (262, SHORT, 32803),
        (273, LONG, raw_at), (277, SHORT, 1), (278, LONG, h), (279, LONG, w * h * 2), (284, SHORT, 1),
        (33421, SHORT, [2, 2]), (33422, BYTE, [0, 1, 1, 2]), (50717, LONG, 4095),
    ]
    ifd0 = [
        (254, LONG, 1), (271, ASCII, make), (272, ASCII, model), (274, SHORT, orientation),
        (50706, BYTE, [1, 4, 0, 0]), (50707, BYTE, [1, 1, 0, 0]), (50708, ASCII, f"{make} {model}"),
        (50778, SHORT, 21),
        (50721, SRATIONAL, [(n, 10000) for n in (9000, -2500, -700, -4000, 12000, 1500, -800, 1800, 6000)]),
    ]
    if date_time:
        ifd0.append((306, ASCII, date_time))
    if thumbnail:
        tw, th = thumbnail
        pixels = np.full((th, tw, 3), thumbnail_colour, np.uint8).tobytes()
        at = tiff.blob(pixels)
        ifd0 += [(256, LONG, tw), (257, LONG, th), (258, SHORT, [8, 8, 8]), (259, SHORT, 1), (262, SHORT, 2),
                 (273, LONG, at), (277, SHORT, 3), (278, LONG, th), (279, LONG, len(pixels)), (284, SHORT, 1)]
    sub_ifds: List[int] = [tiff.ifd(raw_ifd)]
    if preview is not None:
        if preview_size is None:
            preview_size = Image.open(io.BytesIO(preview)).size
        pw, ph = preview_size
        at = tiff.blob(preview)
        sub_ifds.append(tiff.ifd([
            (254, LONG, 1), (256, LONG, pw), (257, LONG, ph), (258, SHORT, [8, 8, 8]), (259, SHORT, 7),
            (262, SHORT, 6), (273, LONG, at), (277, SHORT, 3), (278, LONG, ph), (279, LONG, len(preview)),
            (284, SHORT, 1),
        ]))
    ifd0.append((330, LONG, sub_ifds))
    return tiff.ifd(ifd0)


def write_dng(path, preview_image: Optional[Image.Image] = None, *, taken: Optional[str] = None, **kw) -> str:
    """Write ``dng_bytes`` to ``path`` with ``preview_image`` encoded as its JPEG preview; returns the path."""
    preview = preview_jpeg(preview_image, taken=taken) if preview_image is not None else None
    with open(path, "wb") as f:
        f.write(dng_bytes(preview, **kw))
    return str(path)


if __name__ == "__main__":  # pragma: no cover - a helper for trying the command line by hand
    out = sys.argv[1] if len(sys.argv) > 1 else "photo.dng"
    write_dng(out, drawn_picture(), taken="2021:07:14 09:30:00")
    sys.stdout.write(out + "\n")
