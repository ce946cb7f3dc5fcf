"""Shared fixtures: a small CLIP built offline and saved like a hub model, and images on disk."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JINA_LOG_LEVEL", "WARNING")
# auto's precision probe is recorded once per machine (executors/models/precision.py) and the text tower's ONNX
# export cached (executors/models/onnx_text.py): the tests keep both in a folder of their own, so that every
# server they start in one run decides alike and exports once, and ~/.cache is left alone.
_CACHE = tempfile.mkdtemp(prefix="clipseek-tests-")
_CACHE_OWNER = os.getpid()


@atexit.register
def _remove_cache() -> None:
    if os.getpid() == _CACHE_OWNER:  # not in a forked child that happens to run exit handlers
        shutil.rmtree(_CACHE, ignore_errors=True)


os.environ.setdefault("CLIPSEEK_PRECISION_CACHE", os.path.join(_CACHE, "precision.json"))
os.environ.setdefault("CLIPSEEK_ONNX_CACHE", os.path.join(_CACHE, "onnx"))  # exported text towers, likewise

import pytest
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised small CLIPModel with its tokenizer and image processor, saved to a folder
    and loaded through the same from_pretrained path as a hub model."""
    from clipseek.demo.modelkit import make_tiny_clip

    folder = str(tmp_path_factory.mktemp("models") / "tiny-clip")
    make_tiny_clip(folder, words="a photo of red green blue yellow circle square".split(), seed=0)
    return folder


def call_within(seconds, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a daemon thread, waited for ``seconds``: (finished, its result or the exception
    it raised; None while it still runs). A call that blocks (a read of a named pipe) cannot hang the test."""
    import threading

    out = []

    def run():
        try:
            out.append(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return (not thread.is_alive()), (out[0] if out else None)


def draw_picture(path, colour: str, size=(96, 72), shape: str = "circle") -> str:
    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    img.save(path)
    return str(path)


@pytest.fixture
def picture_dir(tmp_path):
    """Four PNG/JPEG pictures in a nested folder, plus a non-image file that must be ignored."""
    root = tmp_path / "pictures"
    (root / "sub").mkdir(parents=True)
    paths = [
        draw_picture(root / "red.png", "red"),
        draw_picture(root / "green.jpg", "green", shape="square"),
        draw_picture(root / "sub" / "blue.png", "blue", size=(64, 120)),
        draw_picture(root / "sub" / "yellow.jpeg", "yellow"),
    ]
    (root / "notes.txt").write_text("not a picture")
    return root, sorted(paths)


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e starts flows, servers or the CLI in processes of their own: ``slow``
    (``python -m pytest -m "not slow"`` runs the unit tests alone, in well under a minute)."""
    for item in items:
        if f"{os.sep}e2e{os.sep}" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
