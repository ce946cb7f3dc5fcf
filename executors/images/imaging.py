"""Image sources and CLIP preprocessing as pure functions (no torch, no jina).

One way for pixels to travel: ``read_source`` turns a path, file URI, http(s) URL,
data URI or raw bytes into bytes; ``decode_image`` turns bytes into an upright RGB
PIL image; ``preprocess`` turns an RGB image into a normalized CHW float32 array that
matches transformers' ``CLIPImageProcessor`` or ``SiglipImageProcessor``. Each step raises
``ImageError`` with a message that names the input and the cause.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from executors.images.netguard import FetchError, fetch_url
from executors.images.raw import RAW_EXTENSIONS, camera_raw_preview

# What a source that is not a local path starts with.
URL_PREFIXES = ("http://", "https://", "file://", "data:")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
                    *RAW_EXTENSIONS)  # camera RAW (CR2, NEF, DNG, ...) is read by its embedded preview: raw.py

try:  # HEIC / HEIF from phones; AVIF is read by Pillow itself
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - the lock installs it
    pillow_heif = None

# Pillow's warning level; it refuses images above twice this many pixels with DecompressionBombError (decode_ceiling).
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}


class ImageError(ValueError):
    """An input that cannot become pixels; the message names the input and the cause."""


@dataclass(frozen=True)
class Preprocess:
    """The resize / crop / normalize recipe of an image processor, in one of two resize modes.

    - shortest edge (CLIP): resize so the short side is ``shortest_edge``, keeping the aspect ratio,
      then center-crop ``crop_height`` x ``crop_width``.
    - exact (SigLIP; ``resize_height`` and ``resize_width`` set): resize to exactly that height x width,
      aspect ratio not kept, then center-crop ``crop_height`` x ``crop_width`` (the same size when the
      processor does no crop, so the crop changes nothing). ``shortest_edge`` is then the larger of the
      two, which callers use as the draft-decoding target (``decode_image(draft_size=...)``).

    The output is always ``crop_height`` x ``crop_width``, so images of any shape batch together.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = 3
    rescale_factor: float = 1 / 255
    resize_height: Optional[int] = None
    resize_width: Optional[int] = None

    @property
    def exact_resize(self) -> bool:
        return self.resize_height is not None and self.resize_width is not None

    @classmethod
    def from_processor_config(cls, cfg: dict) -> "Preprocess":
        """Build from an image processor's settings (``preprocessor_config.json``, or ``to_dict()``).

        A ``size`` with ``shortest_edge`` (or a plain number) resizes the short side and crops
        ``crop_size``, as CLIPImageProcessor does. A ``size`` with ``height`` and ``width`` and no
        ``shortest_edge`` resizes to exactly that, as SiglipImageProcessor does, and crops ``crop_size``
        only when ``do_center_crop`` is true."""
        size = cfg.get("size", 224)
        mean = tuple(cfg.get("image_mean", cls.mean))
        std = tuple(cfg.get("image_std", cls.std))
        resample = int(cfg.get("resample", 3))
        rescale_factor = float(cfg.get("rescale_factor", 1 / 255))
        if isinstance(size, dict) and "shortest_edge" not in size and "height" in size and "width" in size:
            rh, rw = int(size["height"]), int(size["width"])
            ch, cw = _crop_size(cfg.get("crop_size"), rh, rw) if cfg.get("do_center_crop") else (rh, rw)
            return cls(shortest_edge=max(rh, rw), crop_height=ch, crop_width=cw, mean=mean, std=std,
                       resample=resample, rescale_factor=rescale_factor, resize_height=rh, resize_width=rw)
        shortest = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
        ch, cw = _crop_size(cfg.get("crop_size", shortest), int(shortest), int(shortest))
        return cls(
            shortest_edge=int(shortest),
            crop_height=ch,
            crop_width=cw,
            mean=mean,
            std=std,
            resample=resample,
            rescale_factor=rescale_factor,
        )


def _crop_size(crop, height: int, width: int):
    """(height, width) of a processor's ``crop_size``: a dict, a number, or None for (height, width)."""
    if crop is None:
        return height, width
    if isinstance(crop, dict):
        return int(crop.get("height", height)), int(crop.get("width", width))
    return int(crop), int(crop)


@dataclass
class SourceInfo:
    """What was learnt about a source while reading it."""

    uri: str
    data: bytes
    mtime: Optional[float] = None
    size: Optional[int] = None
    content_hash: str = field(default="")
    facts: Optional["PhotoFacts"] = None  # what the decoded picture's EXIF says (set after decoding)

    def __post_init__(self):
        if not self.content_hash:
            self.content_hash = content_hash(self.data)
        if self.size is None:
            self.size = len(self.data)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def uri_id(uri: str) -> str:
    """Stable document id for a path or URL."""
    return hashlib.sha1(uri.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def local_path(uri: str) -> Optional[str]:
    """The filesystem path of ``uri`` if it is a plain path or a file URI, else None."""
    if uri.startswith("file://"):
        # percent-escapes are bytes: a file URI can name a file whose name is not UTF-8 (see path_uri)
        return os.fsdecode(urllib.parse.unquote_to_bytes(urllib.parse.urlparse(uri).path))
    if "://" in uri or uri.startswith("data:"):
        return None
    return uri


def path_uri(path: str) -> str:
    """A name for a local path that survives UTF-8 transport (gRPC, SQLite, a terminal): the path itself
    when it is valid UTF-8, else a ``file://`` URI whose percent-escapes keep the exact bytes
    (``local_path`` turns it back into the path)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + urllib.parse.quote(os.fsencode(os.path.abspath(path)))


def check_allowed_root(uri: str, path: str, allowed_roots: Optional[Sequence[str]]) -> str:
    """The real path of ``path`` if it lies under one of ``allowed_roots`` (None: anywhere), else ImageError.

    Both sides go through ``os.path.realpath``, so neither ``..`` nor a symlink leads out of a root."""
    real = os.path.realpath(path)
    if allowed_roots is None or _under_roots(real, allowed_roots):
        return real
    raise _outside_roots(uri)


def _under_roots(real: str, allowed_roots: Sequence[str]) -> bool:
    for root in allowed_roots:
        root_real = os.path.realpath(os.path.expanduser(os.fspath(root)))
        try:
            if os.path.commonpath([root_real, real]) == root_real:
                return True
        except ValueError:
            continue
    return False


def _outside_roots(uri: str) -> ImageError:
    return ImageError(f"{uri}: refused: the path is outside the folders this server may read "
                      f"(its allowed roots, set with clipseek serve --allow-root or CLIPSEEK_ALLOWED_ROOTS)")


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_a_regular_file(mode: int) -> Optional[str]:
    """Why a file of this ``st_mode`` is not read ("is a named pipe (FIFO), not a regular file"), or None
    for a regular file. Only regular files are read: a pipe or a device would block or never end."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
    return f"is {kind}, not a regular file"


def _opened_path(fd: int) -> Optional[str]:
    """The path the kernel holds for an open file descriptor (Linux /proc), or None where there is none."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def read_local(uri: str, path: str, *, max_bytes: int = 50 * 2**20, allowed_roots: Optional[Sequence[str]] = None,
               cap_flag: Optional[str] = "clipseek serve --max-download-bytes") -> SourceInfo:
    """The bytes of the local file ``path`` (named ``uri`` in errors): a regular file only, at most ``max_bytes``.

    With ``allowed_roots`` the real path (symlinks resolved) must lie under one of them, checked before the
    file is opened and again on the file that was opened (its path as the kernel holds it), so a symlink
    swapped in between does not lead out. The file is opened without blocking and checked with fstat: a
    named pipe, a device or a socket is refused, never read. At most ``max_bytes`` + 1 bytes are read,
    whatever the file's size says (a file that grows, or one in /proc that reports 0). ``cap_flag``, if
    given, is named in the error for a file over the cap: the setting that moves it."""
    where = f" ({cap_flag})" if cap_flag else ""
    target = path
    if allowed_roots is not None:
        target = check_allowed_root(uri, path, allowed_roots)
    fd = -1
    try:
        why = not_a_regular_file(os.stat(target).st_mode)  # before opening: a device is not even opened
        if why:
            raise ImageError(f"{uri}: {why}")
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        if allowed_roots is not None:
            flags |= getattr(os, "O_NOFOLLOW", 0)  # the real path has no symlink left; one swapped in is refused
        fd = os.open(target, flags)
        st = os.fstat(fd)
        why = not_a_regular_file(st.st_mode)
        if why:
            raise ImageError(f"{uri}: {why}")
        if allowed_roots is not None:
            opened = _opened_path(fd)
            if opened is not None and not _under_roots(opened, allowed_roots):
                raise _outside_roots(uri)
        if st.st_size > max_bytes:
            raise ImageError(f"{uri}: file is {st.st_size} bytes, over the {max_bytes}-byte cap{where}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise ImageError(f"{uri}: file is over the {max_bytes}-byte cap{where}")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{uri}: is a directory, not a regular file") from None
    except PermissionError:
        raise ImageError(f"{uri}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{uri}: cannot read ({e.strerror or e})") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return SourceInfo(uri=uri, data=b"".join(chunks), mtime=st.st_mtime, size=total)


def read_source(uri: str, *, timeout: float = 10.0, max_bytes: int = 50 * 2**20, allow_private: bool = False,
                allowed_roots: Optional[Sequence[str]] = None) -> SourceInfo:
    """Read the bytes behind a path, file URI, http(s) URL or data URI.

    A local path is read by ``read_local``: a regular file only, at most ``max_bytes``, and only if it
    resolves under one of ``allowed_roots`` (None: no restriction) when it is opened.
    An http(s) URL is fetched through ``executors.images.netguard.fetch_url``: redirects checked at every hop,
    and unless ``allow_private`` no host that resolves to a loopback, private or link-local address."""
    if uri.startswith("data:"):
        return SourceInfo(uri=uri[:64], data=_read_data_uri(uri))
    path = local_path(uri)
    if path is not None:
        return read_local(uri, path, max_bytes=max_bytes, allowed_roots=allowed_roots)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"{uri}: unsupported URL scheme {scheme!r} (use a path, file://, http(s):// or data:)")
    try:
        data = fetch_url(uri, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private)
    except FetchError as e:
        raise ImageError(str(e)) from None
    return SourceInfo(uri=uri, data=data)


def _read_data_uri(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("data URI without a ',' separator")
    try:
        if head.endswith(";base64"):
            return base64.b64decode(payload, validate=True)
        return urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URI: invalid base64 payload ({e})") from None


def decode_image(data: bytes, name: str = "image", *, draft_size: Optional[int] = None,
                 max_megapixels: Optional[float] = None) -> Image.Image:
    """Decode bytes into an upright RGB image (EXIF rotation applied, first frame of animations).

    ``draft_size`` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) that still covers
    that many pixels on its short side: much faster for big photos, slightly different pixels.
    A reduced image carries the upright full-scale (width, height) as ``original_size``.
    ``max_megapixels`` bounds what is decoded: a bigger JPEG is decoded at a reduced scale
    that fits, any other bigger image is refused before its pixels are read. Whatever it says,
    nothing over ``decode_ceiling()`` pixels is decoded (Pillow's decompression-bomb guard).
    """
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    data = camera_raw_preview(data, name)  # a camera RAW becomes its embedded JPEG preview; other bytes pass
    try:
        img = Image.open(io.BytesIO(data))
        full_size = img.size
        if max_megapixels and full_size[0] * full_size[1] > max_megapixels * 1e6:
            if img.format != "JPEG":
                raise ImageError(f"{name}: {full_size[0]}x{full_size[1]} is {full_size[0] * full_size[1] / 1e6:.1f} "
                                 f"megapixels, over the limit of {max_megapixels:g} (clipseek serve --max-megapixels)")
            # the largest JPEG decoding scale (1/2, 1/4, 1/8) whose pixels fit the limit
            scale = next((f for f in (0.5, 0.25, 0.125)
                          if full_size[0] * f * full_size[1] * f <= max_megapixels * 1e6), 0.125)
            img.draft("RGB", (int(-(-full_size[0] * scale // 1)), int(-(-full_size[1] * scale // 1))))
            if img.size[0] * img.size[1] > max_megapixels * 1e6:  # 1/8 is the smallest JPEG scale
                raise ImageError(f"{name}: {full_size[0]}x{full_size[1]} cannot be decoded within the limit of "
                                 f"{max_megapixels:g} megapixels (clipseek serve --max-megapixels)")
        elif draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        decoded_size = img.size
        facts = photo_facts(img)
        img = to_rgb(ImageOps.exif_transpose(img))
        img.photo_facts = facts
        if decoded_size != full_size:
            turned = img.size != decoded_size  # EXIF rotated it by 90 or 270 degrees
            img.original_size = (full_size[1], full_size[0]) if turned else full_size
        return img
    except ImageError:
        raise
    except Image.DecompressionBombError:
        ceiling = decode_ceiling()
        raise ImageError(f"{name}: image too large (over {ceiling} pixels, {ceiling / 1e6:.1f} megapixels: the most "
                         f"this server decodes; clipseek serve --max-megapixels can lower that, not raise it)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from None


# EXIF tags: in the Exif IFD (0x8769) DateTimeOriginal and its time-zone offset; in the main IFD DateTime,
# Make and Model; in the GPS IFD (0x8825) latitude, longitude and their hemispheres.
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _DATETIME, _MAKE, _MODEL = 0x9003, 0x9011, 0x0132, 0x010F, 0x0110


@dataclass
class PhotoFacts:
    """What a picture's EXIF says of it: when it was taken (``taken``, seconds since the epoch; ``taken_from``
    names the tag: ``DateTimeOriginal`` or ``DateTime``), the camera, and where (degrees, north and east
    positive). A field the picture does not carry is None."""

    taken: Optional[float] = None
    taken_from: Optional[str] = None
    camera: Optional[str] = None
    latitude: Optional[float] = None
    longitude: Optional[float] = None


def photo_facts(img: Image.Image) -> PhotoFacts:
    """The EXIF facts of a decoded picture (JPEG, PNG, WebP, TIFF, HEIC, AVIF: whatever Pillow reads EXIF
    from); a damaged or absent EXIF block gives empty facts, never an error."""
    facts = PhotoFacts()
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - EXIF is a bonus: a picture with broken EXIF still indexes
        return facts
    if not exif:
        return facts
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001
        sub = {}
    for tag, source, offset in ((_DATETIME_ORIGINAL, sub, sub.get(_OFFSET_ORIGINAL)), (_DATETIME, exif, None)):
        taken = _exif_time(source.get(tag), offset)
        if taken is not None:
            facts.taken, facts.taken_from = taken, "DateTimeOriginal" if tag == _DATETIME_ORIGINAL else "DateTime"
            break
    make, model = (_exif_text(exif.get(t)) for t in (_MAKE, _MODEL))
    if model and make and model.lower().startswith(make.lower().split()[0]):
        make = None  # "Canon" + "Canon EOS R5" says Canon once
    facts.camera = " ".join(p for p in (make, model) if p) or None
    try:
        gps = exif.get_ifd(_GPS_IFD)
        lat, lon = _gps_degrees(gps.get(2), gps.get(1)), _gps_degrees(gps.get(4), gps.get(3))
        if lat is not None and lon is not None and -90 <= lat <= 90 and -180 <= lon <= 180:
            facts.latitude, facts.longitude = lat, lon
    except Exception:  # noqa: BLE001
        pass
    return facts


def _exif_text(value) -> Optional[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip("\x00 ").strip() if value is not None else ""
    return text or None


def _exif_time(value, offset=None) -> Optional[float]:
    """EXIF's "YYYY:MM:DD HH:MM:SS" as seconds since the epoch: in its ``offset`` ("+02:00") where the picture
    records one, else as UTC (a camera's clock has no zone; UTC keeps the date the camera showed)."""
    import datetime as dt

    text = _exif_text(value)
    if not text:
        return None
    try:
        when = dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    zone = dt.timezone.utc
    off = _exif_text(offset)
    if off and len(off) == 6 and off[0] in "+-" and off[3] == ":":
        try:
            minutes = int(off[1:3]) * 60 + int(off[4:6])
            zone = dt.timezone(dt.timedelta(minutes=minutes if off[0] == "+" else -minutes))
        except ValueError:
            pass
    return when.replace(tzinfo=zone).timestamp()


def _gps_degrees(value, ref) -> Optional[float]:
    if not value or len(value) != 3:
        return None
    degrees = float(value[0]) + float(value[1]) / 60 + float(value[2]) / 3600
    return -degrees if _exif_text(ref) in ("S", "W") else degrees


def decode_ceiling() -> Optional[int]:
    """The most pixels any image may have to be decoded: Pillow raises DecompressionBombError above twice
    its ``Image.MAX_IMAGE_PIXELS`` (and only warns between once and twice). None: no ceiling."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent areas become white. 16- and 32-bit grayscale becomes 8 bits
    per channel a band of rows at a time (``to_8bit``), never a float copy of the whole picture."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode in HIGH_BIT_MODES:
        return to_8bit(img).convert("RGB")
    return img.convert("RGB")


# Grayscale modes of more than 8 bits per pixel that to_8bit narrows.
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_BAND_PIXELS = 1 << 18  # pixels converted at a time: a few MB of temporaries whatever the picture's size


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16- or 32-bit grayscale image (``HIGH_BIT_MODES``) as an 8-bit "L" image.

    Values that fit in 8 bits are kept; otherwise the 16-bit range (or, for larger 32-bit values, the
    image's maximum) maps onto 0..255, rounding down. Converted a band of rows at a time with integer
    arithmetic, so what it holds besides the picture is the 8-bit result and one band."""
    width, height = img.size
    low, high = img.getextrema()
    divisor = 255 if high <= 255 else (65535 if high <= 65535 else int(high))
    work = np.uint32 if img.mode != "I" else np.int64  # 65535 * 255 fits in 32 bits; 32-bit values need 64
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = np.asarray(img.crop((0, top, width, min(height, top + rows)))).astype(work)
        if low < 0:
            np.maximum(band, 0, out=band)
        if divisor != 255:
            band *= 255
            band //= divisor
        out[top : top + band.shape[0]] = band
    return Image.fromarray(out, "L")


def array_to_image(arr: np.ndarray, name: str = "tensor") -> Image.Image:
    """An already decoded HWC (or CHW) uint8/float array as an RGB image."""
    a = np.asarray(arr)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3:
        raise ImageError(f"{name}: expected an HxWxC image array, got shape {a.shape}")
    if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float32)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def preprocess(img: Image.Image, recipe: Preprocess) -> np.ndarray:
    """RGB image -> normalized CHW float32, as the model's image processor (CLIPImageProcessor,
    SiglipImageProcessor) computes it."""
    w, h = img.size
    if recipe.exact_resize:
        new_w, new_h = recipe.resize_width, recipe.resize_height
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short = recipe.shortest_edge
        new_long = int(new_short * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=_RESAMPLE.get(recipe.resample, Image.Resampling.BICUBIC))
    # Crop the uint8 pixels first (the zero padding is the same in uint8 and float), then convert
    # only the crop: the same numbers as converting the whole resized image, for a fraction of the work.
    arr = _center_crop(np.asarray(img), recipe.crop_height, recipe.crop_width)
    mean = np.asarray(recipe.mean, dtype=np.float32)
    std = np.asarray(recipe.std, dtype=np.float32)
    out = np.empty((recipe.crop_height, recipe.crop_width, arr.shape[2]), dtype=np.float32)
    np.multiply(arr, np.float32(recipe.rescale_factor), out=out, dtype=np.float32)
    out -= mean
    out /= std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < ch or w < cw:  # pad like transformers does for images smaller than the crop
        ph, pw = max(ch, h), max(cw, w)
        padded = np.zeros((ph, pw, arr.shape[2]), dtype=arr.dtype)
        top, left = (ph - h + 1) // 2, (pw - w + 1) // 2  # transformers rounds the pad up: ceil(diff / 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, ph, pw
    top, left = (h - ch) // 2, (w - cw) // 2
    return arr[top : top + ch, left : left + cw]
