"""Shared helpers for the benchmarks: synthetic photos, a ViT-B/32-sized CLIP with random weights,
timing and table printing. Nothing here is imported by the executors or by the tests."""

from __future__ import annotations

import os
import sys
import math
import time
from typing import List, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JINA_LOG_LEVEL", "WARNING")

# (width, height) of the photos, drawn uniformly: VGA up to a 12-megapixel phone camera.
PHOTO_SIZES = ((640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000), (4000, 3000))


def make_photo(rng: np.random.Generator, width: int, height: int):
    """A photo-like picture: smooth colour gradients, soft shapes and sensor-like noise, so that
    JPEG sizes are realistic (a few hundred KB for VGA, a few MB for 12 MP)."""
    from PIL import Image, ImageDraw, ImageFilter

    lw, lh = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:lh, 0:lw].astype(np.float32)
    base = np.zeros((lh, lw, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 90 * np.sin(a * x / lw * 3 + b * y / lh * 3 + p * 3)
    small = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = rng.uniform(0, lw), rng.uniform(0, lh)
        r = rng.uniform(0.05, 0.3) * min(lw, lh)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
        else:
            draw.rectangle((x0 - r, y0 - r * 0.6, x0 + r, y0 + r * 0.6), fill=fill)
    img = small.filter(ImageFilter.GaussianBlur(1.5)).resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0, 5.0, (height, width, 1)).astype(np.int16)  # luminance grain
    noise = noise + rng.normal(0, 2.0, (height, width, 3)).astype(np.int16)  # and a little colour grain
    arr = np.clip(arr + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_photos(folder: str, count: int, seed: int = 0, sizes: Sequence = PHOTO_SIZES) -> List[str]:
    """``count`` JPEG photos (quality 90) in ``folder``; existing files of the same name are reused."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = sizes[int(rng.integers(len(sizes)))]
        if rng.random() < 0.25:
            w, h = h, w  # some portrait shots
        path = os.path.join(folder, f"photo_{seed}_{i:05d}_{w}x{h}.jpg")
        if not os.path.exists(path):
            make_photo(np.random.default_rng([seed, i]), w, h).save(path, quality=90)
        paths.append(path)
    return paths


def percentiles(samples_s: Sequence[float]):
    a = np.asarray(samples_s) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    out = [line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result of the last call, list of seconds per call)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return result, times


def image_rate(clip, batch_size: int, images: int, warmup: int = 1) -> float:
    """images/s of the image tower (+ L2 norm) on random pixel batches of the model's input size."""
    from executors.images.imaging import Preprocess
    from executors.models.loading import image_embeddings

    recipe = Preprocess.from_processor_config(clip.processor_config)
    x = np.random.default_rng(0).standard_normal((batch_size, 3, recipe.crop_height, recipe.crop_width)).astype(np.float32)
    for _ in range(warmup):
        image_embeddings(clip, x)
    batches = max(1, math.ceil(images / batch_size))
    t0 = time.perf_counter()
    for _ in range(batches):
        image_embeddings(clip, x)
    return batches * batch_size / (time.perf_counter() - t0)
