"""A generated, labelled picture world for the offline demo, the shipped model and the tests.

Each picture shows one to three shapes of one colour, one size, on one background, at a
position, drawn with PIL at 4x and downsampled (anti-aliased), with pixel noise and a
slight background gradient. Everything follows from a seed.

    8 colours x 6 shapes x 2 sizes x 3 counts x 3 backgrounds x 5 positions
"""

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: Dict[str, tuple] = {
    "red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (238, 210, 2), "green": (44, 160, 44),
    "blue": (31, 90, 220), "purple": (128, 60, 170), "pink": (247, 129, 191), "brown": (140, 86, 55),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES = ("small", "large")
COUNTS = {1: "one", 2: "two", 3: "three"}
BACKGROUNDS: Dict[str, tuple] = {"white": (240, 240, 236), "gray": (128, 128, 128), "black": (22, 22, 26)}
POSITIONS = ("left", "right", "top", "bottom", "middle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
          "heart": "hearts"}
ATTRIBUTES = ("colour", "shape", "size", "count", "background")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    count: int
    background: str
    position: str

    def caption(self, style: int = 0, with_position: bool = False, with_background: bool = True) -> str:
        noun = self.shape if self.count == 1 else PLURAL[self.shape]
        number = "a" if self.count == 1 else COUNTS[self.count]
        body = f"{number} {self.size} {self.colour} {noun}"
        if with_position:
            body += f" at the {self.position}" if self.position != "middle" else " in the middle"
        if with_background:
            body += f" on a {self.background} background"
        prefix = ("", "a photo of ", "a picture of ", "an image of ")[style % 4]
        return prefix + body

    def matches(self, other: "Scene", attributes: Sequence[str] = ATTRIBUTES) -> bool:
        return all(getattr(self, a) == getattr(other, a) for a in attributes)


def all_words() -> List[str]:
    words = set("a an of on at the in photo picture image background middle".split())
    words.update(COLOURS, SHAPES, PLURAL.values(), SIZES, COUNTS.values(), BACKGROUNDS, POSITIONS)
    return sorted(words)


def sample_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(list(COUNTS)),
                 rng.choice(list(BACKGROUNDS)), rng.choice(POSITIONS))


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> Optional[list]:
    if shape == "triangle":
        return [(cx + r * math.cos(rot + a), cy + r * math.sin(rot + a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = rot - math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.36
        base = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + x * r / 17, cy + y * r / 17))
        return pts
    return None


def render(scene: Scene, rng: random.Random, size: int = 128, scale: int = 2) -> Image.Image:
    """Draw a scene at ``scale`` times ``size`` and downsample; ``rng`` places, turns, jitters and adds noise."""
    big = size * scale
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    gradient = np.linspace(-1, 1, big, dtype=np.float32)[:, None, None] * rng.uniform(-10, 10)
    canvas = np.clip(bg[None, None, :] + gradient + np.zeros((big, big, 3), np.float32), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    r = big * (rng.uniform(0.07, 0.095) if scene.size == "small" else rng.uniform(0.16, 0.2))
    if scene.count > 1:
        r *= 0.85 if scene.count == 2 else 0.72
    centre = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
              "middle": (0.5, 0.5)}[scene.position]
    cx0, cy0 = centre[0] * big + rng.uniform(-0.04, 0.04) * big, centre[1] * big + rng.uniform(-0.04, 0.04) * big
    spread = r * 2.3
    if scene.count == 1:
        offsets = [(0.0, 0.0)]
    else:
        horizontal = scene.position in ("top", "bottom", "middle")
        step = [(i - (scene.count - 1) / 2) * spread for i in range(scene.count)]
        offsets = [(s, 0.0) if horizontal else (0.0, s) for s in step]
    xs = [cx0 + dx for dx, _ in offsets]
    ys = [cy0 + dy for _, dy in offsets]
    margin = r * 1.08
    cx0 += max(0.0, margin - min(xs)) - max(0.0, max(xs) - (big - margin))
    cy0 += max(0.0, margin - min(ys)) - max(0.0, max(ys) - (big - margin))
    colour = tuple(int(np.clip(c + rng.uniform(-14, 14), 0, 255)) for c in COLOURS[scene.colour])
    for dx, dy in offsets:
        cx, cy = cx0 + dx, cy0 + dy
        rot = rng.uniform(-0.25, 0.25)
        pts = _shape_points(scene.shape, cx, cy, r, rot)
        if scene.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif scene.shape == "square":
            h = r * 0.85
            c, s = math.cos(rot), math.sin(rot)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-h, -h), (h, -h), (h, h), (-h, h))],
                         fill=colour)
        else:
            draw.polygon(pts, fill=colour)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 7), arr.shape)
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


def scenes(seed: int, n: int) -> Iterator[tuple]:
    """(scene, rng for drawing it) pairs, deterministic for a seed."""
    rng = random.Random(seed)
    for _ in range(n):
        yield sample_scene(rng), random.Random(rng.getrandbits(64))


def write_world(folder: str, n: int = 240, seed: int = 7, size: int = 128, fmt: str = "jpg") -> List[dict]:
    """Write ``n`` pictures and a ``captions.jsonl`` (file, caption, attributes) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, (scene, rng) in enumerate(scenes(seed, n)):
        name = f"{i:05d}_{scene.count}-{scene.size}-{scene.colour}-{scene.shape}-{scene.background}.{fmt}"
        path = os.path.join(folder, name)
        render(scene, rng, size).save(path, quality=92) if fmt == "jpg" else render(scene, rng, size).save(path)
        records.append({"file": name, "caption": scene.caption(), **asdict(scene)})
    with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records


def read_world(folder: str) -> List[dict]:
    with open(os.path.join(folder, "captions.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def scene_of(record: dict) -> Scene:
    return Scene(**{k: record[k] for k in ("colour", "shape", "size", "count", "background", "position")})


def write_video(path: str, shots: Sequence[tuple], fps: int = 10, size: tuple = (320, 240), codec: str = "libx264",
                seed: int = 0) -> List[dict]:
    """A video of the world: ``shots`` is a list of (scene, seconds); each shot shows its scene, drawn once
    and drifting a pixel per frame, with fresh grain in every frame, so that the frames of a shot are alike
    and a new shot is a cut. Written with PyAV (``codec``: libx264 for .mp4/.mov/.mkv, libvpx-vp9 for
    .webm). Returns one record per shot: caption, start and end in seconds."""
    import av

    rng = random.Random(seed)
    grain = np.random.default_rng(seed)
    records, start = [], 0.0
    with av.open(path, mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for scene, seconds in shots:
            still = np.asarray(render(scene, random.Random(rng.getrandbits(64)), size=min(size)).resize(size))
            frames = max(1, round(seconds * fps))
            for i in range(frames):
                moved = np.roll(still, i % 8, axis=1).astype(np.int16) + grain.integers(-6, 7, still.shape)
                frame = av.VideoFrame.from_ndarray(np.clip(moved, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            records.append({"caption": scene.caption(), "start": start, "end": start + frames / fps, **asdict(scene)})
            start += frames / fps
        for packet in stream.encode():
            out.mux(packet)
    return records
