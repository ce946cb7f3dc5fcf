"""Camera RAW files (CR2, CR3, NEF, ARW, DNG, RAF, ORF, RW2) read through the JPEG preview they embed.

Every camera stores a full- or near-full-size JPEG beside the sensor data: the picture it showed on its
own screen, already developed with the camera's colours. clipseek indexes that preview and never
demosaics the raw mosaic, which would cost seconds per file and give no better embedding.

The preview is found by LibRaw (through rawpy, ``RawPy.extract_thumb``) rather than by walking TIFF
structures here: only part of these formats is TIFF (CR3 is ISO base media, RAF has its own header,
NEF and ARW hide the preview in sub-IFDs or maker notes, ORF and RW2 use their own TIFF magic), and
LibRaw already knows each camera's layout and picks the largest preview a file holds. Only the file's
metadata and its preview are read; the raw data is never unpacked.

``camera_raw_preview`` is the one entry point: given the bytes of any picture it returns them unchanged
unless they are a camera RAW, in which case it returns the preview as a JPEG (or, for a file whose only
picture is an uncompressed thumbnail, as a PNG) for ``imaging.decode_image`` to decode like any other
picture: EXIF date and orientation, ``--max-megapixels`` and the decompression guard all apply. The
preview's EXIF is rewritten into one block that carries what clipseek reads from a picture (camera,
dates, GPS, orientation), filled from the RAW's own metadata where the preview has none: cameras store
the orientation in the RAW, not in the preview. A RAW with no preview, one whose preview is damaged or
smaller than ``MIN_PREVIEW_SIDE`` pixels, or a truncated file raises ``ImageError`` naming the file.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import struct
import time
import urllib.parse
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# What folders and globs pick up as camera RAW (imaging.IMAGE_EXTENSIONS includes them).
RAW_EXTENSIONS = (".cr2", ".cr3", ".nef", ".arw", ".dng", ".raf", ".orf", ".rw2")

# A preview whose short side is smaller than this is an icon, not a picture to embed.
MIN_PREVIEW_SIDE = 64

# docarray accepts an image ``url`` only when mimetypes calls its extension an image; Python's own table
# (and most /etc/mime.types) lacks several RAW extensions, so they are registered here.
_MIME_TYPES = {".cr2": "image/x-canon-cr2", ".cr3": "image/x-canon-cr3", ".nef": "image/x-nikon-nef",
               ".arw": "image/x-sony-arw", ".dng": "image/x-adobe-dng", ".raf": "image/x-fuji-raf",
               ".orf": "image/x-olympus-orf", ".rw2": "image/x-panasonic-rw2"}
for _ext, _type in _MIME_TYPES.items():
    if not (mimetypes.guess_type("x" + _ext)[0] or "").startswith("image/"):
        mimetypes.add_type(_type, _ext)

# TIFF tags that mark a TIFF as a camera's raw file rather than a picture: DNGVersion, and in any IFD a
# colour-filter-array or linear-raw photometric, or a compression only raw data uses (Nikon NEF, Sony ARW,
# Pentax PEF, lossy DNG, Kodak).
_DNG_VERSION, _PHOTOMETRIC, _COMPRESSION, _SUB_IFDS = 0xC612, 0x0106, 0x0103, 0x014A
_RAW_PHOTOMETRIC = {32803, 34892}
_RAW_COMPRESSION = {32767, 32769, 32770, 32773, 34713, 34892, 65000}
_MAX_IFDS = 32

# Signatures of the formats Pillow reads: bytes that start so are a picture whatever their name says.
_PICTURE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")

# EXIF: IFD0's Make, Model, Orientation, DateTime; in the Exif IFD DateTimeOriginal and its offsets.
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION, _DATETIME = 0x010F, 0x0110, 0x0112, 0x0132
_EXIF_DATES = (0x9003, 0x9010, 0x9011)
# LibRaw's rotation code (sizes.flip) as an EXIF orientation, the way LibRaw itself converts it.
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
_EXIF_TIME = "%Y:%m:%d %H:%M:%S"


def raw_kind(data: bytes) -> Optional[str]:
    """The camera RAW format the bytes are ("CR2", "CR3", "RAF", "ORF", "RW2", "DNG", or "RAW" for another
    TIFF-based raw such as NEF or ARW), or None for anything else: a plain TIFF is not a RAW."""
    head = bytes(data[:16])
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "RAF"
    if head[4:8] == b"ftyp" and head[8:12] == b"crx ":
        return "CR3"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return "ORF"
    if head[:4] == b"IIU\0":
        return "RW2"
    if head[:4] in (b"II*\0", b"MM\0*"):
        if head[8:10] == b"CR":
            return "CR2"
        return _tiff_raw_kind(data)
    return None


def _tiff_raw_kind(data: bytes) -> Optional[str]:
    """Walk a TIFF's IFDs (the IFD0 chain and SubIFDs, at most ``_MAX_IFDS``) for the tags of raw data."""
    if len(data) < 8:
        return None
    order = "<" if data[:2] == b"II" else ">"
    pending, seen, kind = [struct.unpack(order + "I", data[4:8])[0]], set(), None
    while pending and len(seen) < _MAX_IFDS:
        at = pending.pop(0)
        if at in seen or at < 8 or at + 2 > len(data):
            continue
        seen.add(at)
        (count,) = struct.unpack(order + "H", data[at : at + 2])
        end = at + 2 + 12 * count
        if end + 4 > len(data):
            count = max(0, (len(data) - at - 2) // 12)  # a truncated IFD: read the entries that are there
        for i in range(count):
            tag, typ, n = struct.unpack(order + "HHI", data[at + 2 + 12 * i : at + 10 + 12 * i])
            value_at = at + 10 + 12 * i
            if tag == _DNG_VERSION:
                return "DNG"
            if tag in (_PHOTOMETRIC, _COMPRESSION) and typ == 3:
                (value,) = struct.unpack(order + "H", data[value_at : value_at + 2])
                if value in (_RAW_PHOTOMETRIC if tag == _PHOTOMETRIC else _RAW_COMPRESSION):
                    kind = "RAW"
            elif tag == _SUB_IFDS and typ in (4, 13) and 0 < n <= _MAX_IFDS:
                where = value_at if n == 1 else struct.unpack(order + "I", data[value_at : value_at + 4])[0]
                if where + 4 * n <= len(data):
                    pending += struct.unpack(order + "%dI" % n, data[where : where + 4 * n])
        if end + 4 <= len(data):
            pending.append(struct.unpack(order + "I", data[end : end + 4])[0])
    return kind


def has_raw_extension(name: str) -> bool:
    """Whether a path or URL (query string aside) ends with a camera RAW extension."""
    return _extension(name) in RAW_EXTENSIONS


def _extension(name: str) -> str:
    path = urllib.parse.urlsplit(name).path if "://" in name else name
    return os.path.splitext(path)[1].lower()


def camera_raw_preview(data: bytes, name: str = "image") -> bytes:
    """``data`` unchanged, unless it is a camera RAW (by its content, or by ``name``'s extension for bytes
    that no picture format claims, such as a truncated RAW): then its embedded preview as JPEG (or PNG)
    bytes. Raises ``ImageError`` naming ``name`` when a RAW has no preview clipseek can read."""
    kind = raw_kind(data)
    if kind is None:
        if not has_raw_extension(name) or bytes(data[:4]).startswith(_PICTURE_SIGNATURES):
            return data
        kind = _extension(name)[1:].upper()
    try:
        import rawpy
    except ImportError:  # pragma: no cover - the lock installs it
        raise _error(name, kind, "reading camera RAW needs the rawpy package") from None
    raw = rawpy.RawPy()
    try:
        try:
            raw.open_buffer(_Whole(data))
            thumb = raw.extract_thumb()
            flip = int(raw.sizes.flip)
            taken = _raw_time(raw)
            is_jpeg = thumb.format == rawpy.ThumbFormat.JPEG
            preview = bytes(thumb.data) if is_jpeg else np.array(thumb.data)  # a copy that outlives LibRaw's
        except Exception as e:  # noqa: BLE001 - LibRaw's errors (and any other) on a hostile file: a broken picture
            raise _error(name, kind, _libraw_message(e)) from None
    finally:
        raw.close()
    if is_jpeg:
        return _jpeg_preview(preview, name, kind, flip)
    return _bitmap_preview(preview, name, kind, flip, taken)


class _Whole:
    """A file-like object whose ``read()`` hands over the bytes themselves (rawpy reads a buffer whole)."""

    def __init__(self, data):
        self.data = data if isinstance(data, bytes) else bytes(data)

    def read(self, *args):
        return self.data


def _error(name: str, kind: str, why: str):
    from executors.images.imaging import ImageError

    return ImageError(f"{name}: is a camera RAW ({kind}) with no embedded preview clipseek can read ({why}); "
                      f"clipseek indexes a RAW by its preview and does not develop the raw data")


def _libraw_message(e: BaseException) -> str:
    text = e.args[0] if e.args else type(e).__name__
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text).strip().rstrip(".") or type(e).__name__


def _raw_time(raw) -> Optional[str]:
    """When the RAW says it was taken, as EXIF text, or None (LibRaw's timestamp is 0 when it says nothing)."""
    try:
        when = raw.other.timestamp
        return None if when.timestamp() == 0 else when.strftime(_EXIF_TIME)
    except (AttributeError, ValueError, OverflowError, OSError):
        return None


def _jpeg_segments(jpeg: bytes) -> Tuple[List[Tuple[int, int, int]], int]:
    """The header segments of a JPEG as (marker, start, end), and where its first scan (SOS) starts;
    ValueError when the bytes do not reach a scan."""
    if not jpeg.startswith(b"\xff\xd8"):
        raise ValueError("the preview is not a JPEG")
    segments, at = [], 2
    while at + 4 <= len(jpeg):
        if jpeg[at] != 0xFF:  # stray bytes between segments: skipped to the next marker, as libjpeg does
            at = jpeg.find(b"\xff", at)
            if at < 0:
                break
            continue
        marker = jpeg[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:
            return segments, at
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        (length,) = struct.unpack(">H", jpeg[at + 2 : at + 4])
        if length < 2:
            raise ValueError("the preview's JPEG markers are damaged")
        segments.append((marker, at, at + 2 + length))
        at += 2 + length
    raise ValueError("the preview is truncated")


def _jpeg_preview(jpeg: bytes, name: str, kind: str, flip: int) -> bytes:
    """LibRaw's JPEG preview checked whole, with its EXIF blocks merged into one (``_merged_exif``)."""
    try:
        segments, scan = _jpeg_segments(jpeg)
        if jpeg.rfind(b"\xff\xd9", scan) < 0:  # no end-of-image marker after the scan: cut short
            raise ValueError("the preview is truncated")
        exif = [jpeg[start + 4 : end] for marker, start, end in segments
                if marker == 0xE1 and jpeg[start + 4 : start + 10] == b"Exif\0\0"]
        block = _merged_exif(exif, flip)
        if block is not None:
            kept = b"".join(jpeg[start:end] for marker, start, end in segments
                            if not (marker == 0xE1 and jpeg[start + 4 : start + 10] == b"Exif\0\0"))
            jpeg = b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(block) + 2) + block + kept + jpeg[scan:]
        size = _jpeg_frame_size(jpeg, segments)
    except (ValueError, struct.error) as e:
        raise _error(name, kind, str(e)) from None
    _check_size(size, name, kind)
    return jpeg


def _jpeg_frame_size(jpeg: bytes, segments) -> Tuple[int, int]:
    """(width, height) from a JPEG's frame header (SOF0 to SOF15)."""
    for marker, start, end in segments:
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and end - start >= 9:
            height, width = struct.unpack(">HH", jpeg[start + 5 : start + 9])
            return width, height
    raise ValueError("the preview has no JPEG frame header")


def _merged_exif(blocks: List[bytes], flip: int) -> Optional[bytes]:
    """One EXIF block ("Exif\\0\\0" + TIFF) with the tags clipseek reads, merged from the preview's blocks
    (LibRaw puts one built from the RAW's metadata first when the preview has none of its own; a later
    block's tag wins): camera, DateTime, the Exif IFD's dates, the GPS IFD, and the orientation, which
    is the last one other than 1 that a block states, else the RAW's own. None when nothing is left to
    say or the block cannot be written (the preview then keeps its blocks as they are)."""
    out = Image.Exif()
    orientation = 1
    no_date = time.strftime(_EXIF_TIME, time.localtime(0))  # what LibRaw writes for a RAW without a date
    try:
        for block in blocks:
            exif = Image.Exif()
            exif.load(block)
            for tag in (_MAKE, _MODEL, _DATETIME):
                value = exif.get(tag)
                if value not in (None, "", b"") and not (tag == _DATETIME and value == no_date):
                    out[tag] = value
            if exif.get(_ORIENTATION) in range(2, 9):
                orientation = exif[_ORIENTATION]
            sub = exif.get_ifd(_EXIF_IFD)
            for tag in _EXIF_DATES:
                if sub.get(tag):
                    out.get_ifd(_EXIF_IFD)[tag] = sub[tag]
            gps = exif.get_ifd(_GPS_IFD)
            if gps:
                out.get_ifd(_GPS_IFD).clear()
                out.get_ifd(_GPS_IFD).update(gps)
        if orientation == 1:
            orientation = _FLIP_TO_ORIENTATION.get(flip, 1)
        if orientation != 1:
            out[_ORIENTATION] = orientation
        if not out and not blocks:
            return None
        block = out.tobytes()
    except Exception as e:  # noqa: BLE001 - EXIF is a bonus: a preview with odd EXIF still indexes
        log.debug("camera RAW preview: EXIF left as it is (%s)", e)
        return None
    return block if len(block) + 2 <= 0xFFFF else None


def _bitmap_preview(pixels, name: str, kind: str, flip: int, taken: Optional[str]) -> bytes:
    """An uncompressed thumbnail (LibRaw's HxWxC array) as PNG bytes whose EXIF carries the RAW's
    orientation and date."""
    from executors.images.imaging import array_to_image, decode_ceiling

    a = np.asarray(pixels)
    if a.ndim not in (2, 3) or a.size == 0:
        raise _error(name, kind, f"its thumbnail has shape {a.shape}")
    height, width = a.shape[:2]
    _check_size((width, height), name, kind)
    ceiling = decode_ceiling()
    if ceiling is not None and width * height > ceiling:
        raise _error(name, kind, f"its {width}x{height} thumbnail is over {ceiling} pixels")
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    img = array_to_image(a, name)
    exif = Image.Exif()
    if _FLIP_TO_ORIENTATION.get(flip, 1) != 1:
        exif[_ORIENTATION] = _FLIP_TO_ORIENTATION[flip]
    if taken:
        exif[_DATETIME] = taken
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1, **({"exif": exif.tobytes()} if exif else {}))
    return buf.getvalue()


def _check_size(size: Tuple[int, int], name: str, kind: str) -> None:
    if min(size) < MIN_PREVIEW_SIDE:
        raise _error(name, kind, f"its largest preview is {size[0]}x{size[1]}, smaller than {MIN_PREVIEW_SIDE} "
                                 f"pixels on a side")
