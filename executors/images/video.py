"""Moments of a video file: the frames worth embedding, with their times, decoded with PyAV (FFmpeg).

A video becomes a few still pictures, each a *moment* with its time in seconds: the first frame, a frame
at every scene change (a cut: the picture differs from the last kept one by more than ``scene_change``,
on a 32x32 grey thumbnail), and at least one every ``spacing`` seconds however still the video is. At
most ``max_moments`` are kept: a longer video is sampled evenly over its whole length. Each moment is
scaled down while it is decoded (short side ``short_side``), so a 4K video costs no more memory than a
thumbnail strip. The moments then take the same path as any picture (preprocess -> model -> rows).

A damaged or truncated video keeps the moments decoded before the damage (``VideoMoments.damaged`` says
where it stopped); one with no decodable frame at all raises ``ImageError`` naming it.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import List, Optional

import numpy as np
from PIL import Image

from executors.images.imaging import IMAGE_EXTENSIONS, ImageError, is_image_file

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi")
DEFAULT_SPACING = 5.0  # seconds: at least one moment this often
DEFAULT_MAX_MOMENTS = 120  # per video; a longer one is sampled evenly
MAX_VIDEO_BYTES = 512 * 2**20  # the most of a video file that is read (it is decoded from memory)
SCENE_CHANGE = 0.12  # mean absolute difference of two 32x32 grey thumbnails, 0..1, that counts as a cut
MIN_SCENE_GAP = 0.5  # seconds: cuts closer than this to the last kept moment are one scene (flashes, fades)
SCENE_CHECKS_PER_SECOND = 4  # how often a frame is compared with the last kept one


@dataclass
class Moment:
    t: float  # seconds from the start
    image: Image.Image  # RGB, scaled down to the short side asked for


@dataclass
class VideoMoments:
    moments: List[Moment]
    width: int
    height: int
    duration: Optional[float]
    created: Optional[float] = None  # the container's creation_time (seconds since the epoch), if it records one
    damaged: Optional[str] = None  # why decoding stopped early, if it did
    frames_decoded: int = 0
    notes: List[str] = field(default_factory=list)


def is_video_file(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def is_media_file(path: str) -> bool:
    """A file clipseek indexes, by its extension: a picture or a video."""
    return is_image_file(path) or is_video_file(path)


def media_extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)


def looks_like_video(data: bytes) -> bool:
    """Whether bytes start like a video container clipseek reads: ISO-BMFF (mp4/mov/m4v, but not the
    HEIF/AVIF still pictures that share the box layout), Matroska/WebM, or AVI."""
    head = data[:16]
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        return brand not in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


def moment_uri(uri: str, t: float) -> str:
    """``video.mp4#t=12.5``: a Media Fragments URI naming a moment of a video."""
    return f"{uri}#t={format_time(t)}"


def format_time(t: float) -> str:
    return f"{t:.2f}".rstrip("0").rstrip(".")


def split_moment(uri: str):
    """``video.mp4#t=12.5`` -> (``video.mp4``, 12.5); any other uri -> (uri, None)."""
    base, sep, fragment = uri.rpartition("#t=")
    if sep and base and is_video_file(base):
        try:
            return base, float(fragment)
        except ValueError:
            pass
    return uri, None


def frame_at(data: bytes, t: float, name: str = "video", short_side: Optional[int] = None) -> Image.Image:
    """The frame shown at ``t`` seconds (the first one at or after it), as RGB. Raises ImageError."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            if t > 0 and stream.time_base:
                container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
            last = None
            for frame in container.decode(stream):
                last = frame
                if frame.time is None or frame.time >= t - 1e-3:
                    break
            if last is None:
                raise ImageError(f"{name}: no frame at {format_time(t)} s")
            size = _scaled(last.width, last.height, short_side)
            return (last.to_image(width=size[0], height=size[1]) if size else last.to_image()).convert("RGB")
    except (av.FFmpegError, ValueError, OSError, IndexError) as e:
        raise ImageError(f"{name}: cannot decode video ({_reason(e)})") from None


def video_moments(data: bytes, name: str = "video", *, spacing: float = DEFAULT_SPACING,
                  max_moments: int = DEFAULT_MAX_MOMENTS, short_side: Optional[int] = 448,
                  scene_change: float = SCENE_CHANGE) -> VideoMoments:
    """The moments of the video in ``data`` (see the module's docstring). Raises ImageError."""
    import av  # PyAV: imported here so pictures never load FFmpeg

    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if spacing <= 0 or max_moments < 1:
        raise ValueError("spacing must be > 0 and max_moments >= 1")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot open video ({_reason(e)})") from None
    try:
        if not container.streams.video:
            raise ImageError(f"{name}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = _duration(container, stream)
        created = _creation_time(container)
        size = _scaled(width, height, short_side)
        kept: List[Moment] = []
        last_grey: Optional[np.ndarray] = None
        last_kept_t = last_check_t = -1e9
        damaged: Optional[str] = None
        decoded, last_t = 0, None
        try:
            for frame in container.decode(stream):
                decoded += 1
                t = _frame_time(frame, decoded, stream)
                if t is None:
                    continue
                last_t = t
                due = t - last_kept_t >= spacing
                if not due and (t - last_check_t < 1.0 / SCENE_CHECKS_PER_SECOND or t - last_kept_t < MIN_SCENE_GAP):
                    continue
                last_check_t = t
                grey = frame.reformat(width=32, height=32, format="gray").to_ndarray().astype(np.float32) / 255.0
                cut = last_grey is None or float(np.abs(grey - last_grey).mean()) > scene_change
                if not (due or cut):
                    continue
                image = frame.to_image(width=size[0], height=size[1]) if size else frame.to_image()
                kept.append(Moment(t=round(max(t, 0.0), 3), image=image.convert("RGB")))
                last_grey, last_kept_t = grey, t
                if len(kept) >= 2 * max_moments:  # a long video: keep every other one, still evenly spread
                    kept = kept[::2]
                    spacing *= 2
        except (av.FFmpegError, ValueError, OSError, MemoryError) as e:
            damaged = _reason(e)
        if damaged is None and duration and last_t is not None and last_t < duration - max(1.0, 0.1 * duration):
            damaged = f"the frames end at {last_t:.1f} s of the {duration:.1f} s its header gives"
        if not kept:
            why = f" ({damaged})" if damaged else ""
            raise ImageError(f"{name}: cannot decode video: no frame could be read{why}")
        if len(kept) > max_moments:
            picks = np.unique(np.linspace(0, len(kept) - 1, max_moments).round().astype(int))
            kept = [kept[i] for i in picks]
        if damaged:
            logger.warning("%s: video is damaged after %.1f s (%s); kept the %d moments before it",
                           name, kept[-1].t, damaged, len(kept))
        return VideoMoments(moments=kept, width=width, height=height, duration=duration, created=created,
                            damaged=damaged, frames_decoded=decoded)
    finally:
        container.close()


def _scaled(width: int, height: int, short_side: Optional[int]):
    """(w, h) with the short side ``short_side``, or None to keep the frame's size (never scaled up)."""
    if not short_side or not width or not height or min(width, height) <= short_side:
        return None
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _frame_time(frame, index: int, stream) -> Optional[float]:
    if frame.time is not None:
        return float(frame.time)
    rate = stream.average_rate or stream.guessed_rate
    return (index - 1) / float(rate) if rate else None


def _duration(container, stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _creation_time(container) -> Optional[float]:
    """The container's ``creation_time`` tag (what phones write), as seconds since the epoch."""
    value = (container.metadata or {}).get("creation_time")
    if not value:
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.year < 1971:  # an unset date (the 1904 or 1970 epoch of the format)
        return None
    return when.timestamp()


def _reason(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
