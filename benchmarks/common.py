"""Shared helpers for the benchmarks: synthetic photos, a ViT-B/32-sized CLIP with random weights,
timing, and the tables a run prints, written as markdown to ``benchmarks/results/<script>.md``
(``Results``). Nothing here is imported by the executors; the tests import only the table writer."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

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


RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def cpu_kind() -> str:
    """torch's CPU capability and whether the CPU runs bfloat16 and int8 dot products natively,
    e.g. ``AVX512, avx512_bf16 yes, vnni yes``; ``unknown (no torch)`` without torch."""
    try:
        import torch
    except ImportError:
        return "unknown (no torch)"
    flags = []
    for label, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("vnni", "_is_vnni_supported")):
        check = getattr(torch.cpu, probe, None)
        flags.append(f"{label} {'?' if check is None else 'yes' if check() else 'no'}")
    kind = ", ".join([str(torch.backends.cpu.get_cpu_capability()), *flags])
    if "avx2_cpuid" in os.environ.get("LD_PRELOAD", ""):
        kind += " as CPUID reports it under tests/avx2_cpuid.c (the host's own CPU: " + host_flags() + ")"
    return kind


def kind_suffix() -> str:
    """``.avx2`` where the CPU is of the AVX2-only kind (as its kernels see it: a real one, or the host under
    tests/avx2_cpuid.c), else nothing: the results files of the two kinds sit side by side."""
    try:
        from executors.models.precision import avx2_only
    except ImportError:  # no torch
        return ""
    return ".avx2" if avx2_only() else ""


def host_flags() -> str:
    """What the kernel says the CPU has of AVX-512, bfloat16 and VNNI (/proc/cpuinfo, which CPUID faulting does
    not change): ``avx512f avx512_bf16 avx512_vnni``, ``none of AVX-512, bfloat16, VNNI`` or ``unknown``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return "unknown"
    seen = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return " ".join(seen) or "none of AVX-512, bfloat16, VNNI"


def machine() -> str:
    """CPU model, CPUs this process may use, RAM: ``AMD EPYC, 2 CPUs, 23.5 GiB RAM``."""
    model = platform.processor() or platform.machine()
    ram = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        with open("/proc/meminfo") as f:
            ram = next(int(line.split()[1]) for line in f if line.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} CPUs" + (f", {ram:.1f} GiB RAM" if ram else "")


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed (script path relative to the project), with the CLIPSEEK_* / *_NUM_THREADS
    environment it ran under in front."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]) and argv[0].startswith(ROOT + os.sep):
        argv[0] = os.path.relpath(argv[0], ROOT)
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("CLIPSEEK_") or k.endswith("_NUM_THREADS")]
    return shlex.join([*env, "python", *argv])


class Results:
    """What a benchmark prints, as markdown, also written to ``benchmarks/results/<script>.md``.

    The file starts with one header line (when the run started and ended, UTC; the CPU kind; the machine;
    torch; the command and every option it ran with), then each ``table`` (its caption, the table, an
    optional note) and ``note`` in the order the run printed them. ``benchmarks/update_docs.py`` splices
    the file into the docs between ``<!-- results:<script> -->`` and ``<!-- /results -->``."""

    def __init__(self, script: str, options: Optional[Mapping[str, Any]] = None, argv: Optional[Sequence[str]] = None,
                 folder: Optional[str] = None, echo: bool = True, kind: Optional[str] = None):
        self.name = os.path.splitext(os.path.basename(script))[0]
        self.kind = kind_suffix() if kind is None else kind  # the results file's CPU kind suffix
        self.options = {k: v for k, v in (options or {}).items()}
        self.command = command_line(argv)
        self.folder = folder or RESULTS_DIR
        self.echo = echo
        self.started = time.gmtime()
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        self.blocks: List[str] = []

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def table(self, caption: str, headers: Sequence[str], rows: Sequence[Sequence], note: str = "") -> str:
        """Print the caption, the table and the note, and keep them for the results file; the table's markdown."""
        text = table(headers, rows)
        block = "\n\n".join(part for part in (caption.strip(), text, note.strip()) if part)
        self._say("\n" + block)
        self.blocks.append(block)
        return text

    def note(self, text: str) -> None:
        """A paragraph of the results (printed and kept)."""
        self._say("\n" + text.strip())
        self.blocks.append(text.strip())

    def header(self, ended: Optional[time.struct_time] = None) -> str:
        ended = ended or time.gmtime()
        start = time.strftime("%Y-%m-%d %H:%M", self.started)
        end = time.strftime("%H:%M" if ended[:3] == self.started[:3] else "%Y-%m-%d %H:%M", ended)
        try:
            import torch

            versions = f"torch {torch.__version__}, numpy {np.__version__}"
        except ImportError:
            versions = f"numpy {np.__version__}"
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return (f"Run {start}-{end} UTC; CPU {cpu_kind()}; {machine()}; {versions}; load average {self.load:.2f} at the "
                f"start, {load:.2f} at the end; `{self.command}`" + (f" (options: {options})" if options else ""))

    def markdown(self) -> str:
        return "\n\n".join([self.header(), *self.blocks]) + "\n"

    def write(self) -> str:
        """Write ``<folder>/<script>.md`` (``<script>.avx2.md`` on an AVX2-only CPU, so that each CPU kind keeps
        its own figures; replaced whole, atomically); its path."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{self.name}{self.kind}.md")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.markdown())
        os.replace(tmp, path)
        self._say(f"\n(written to {os.path.relpath(path, ROOT)})")
        return path


def options_of(args, hide: Sequence[str] = ()) -> Dict[str, Any]:
    """The parsed options of a run (argparse namespace), without ``hide`` (the ones only its child processes use)."""
    return {k: v for k, v in vars(args).items() if k not in hide}


def timed(fn, *args, repeat: int = 1, **kwargs):
    """(result of the last call, list of seconds per call)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return result, times


def image_rate(clip, batch_size: int, images: int, warmup: int = 1, streams: int = 1) -> float:
    """images/s of the image tower (+ L2 norm) on random pixel batches of the model's input size: each batch on
    every thread, or split into ``streams`` parts side by side, as the encoder runs them
    (``executors.models.loading.submit_image_embeddings``)."""
    from executors.images.imaging import Preprocess
    from executors.models.loading import embed_in_order

    recipe = Preprocess.from_processor_config(clip.processor_config)
    x = np.random.default_rng(0).standard_normal((batch_size, 3, recipe.crop_height, recipe.crop_width)).astype(np.float32)

    def run(batches: int) -> None:
        for _ in embed_in_order(clip, (x for _ in range(batches)), streams):
            pass

    run(warmup)
    batches = max(1, math.ceil(images / batch_size))
    t0 = time.perf_counter()
    run(batches)
    return batches * batch_size / (time.perf_counter() - t0)
