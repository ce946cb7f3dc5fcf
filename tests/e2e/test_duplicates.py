"""Near-duplicates: blockwise over the memmap, and on generated variants of the same pictures."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from executors.store.vector_store import Record, VectorStore
from clipseek.demo import world
from flows.settings import DEMO_MODEL_DIR


def test_groups_are_found_blockwise(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[:5] + rng.normal(scale=0.02, size=(5, 32)).astype(np.float32)  # 5 near copies
    store = VectorStore(str(tmp_path / "s"))
    vectors = np.concatenate([base, copies, copies[:1] * 1.0001])  # id0 has two near copies
    store.upsert(vectors, [Record(id=f"o{i}") for i in range(50)] + [Record(id=f"c{i}") for i in range(5)]
                 + [Record(id="c0b")])
    groups = store.near_duplicates(threshold=0.95, block_rows=7)  # blocks much smaller than the index
    as_sets = sorted(sorted(r.id for r, _ in g) for g in groups)
    assert as_sets == sorted([["c0", "c0b", "o0"]] + [[f"c{i}", f"o{i}"] for i in range(1, 5)])
    assert all(score >= 0.95 for g in groups for _, score in g)
    store.delete(["c1"])
    assert ["c1", "o1"] not in sorted(sorted(r.id for r, _ in g) for g in store.near_duplicates(0.95))


@pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")), reason="no demo model")
def test_variants_of_the_same_picture_group_together(tmp_path):
    from clipseek.client import ClipseekClient
    from flows.serving import flows_in_subprocess, free_port
    from flows.settings import Settings

    folder = tmp_path / "pictures"
    records = world.write_world(str(folder), n=40, seed=77)
    # distinct pictures: one per colour and shape, so that the originals are no near-duplicates of each other
    chosen, seen = [], set()
    for r in records:
        if (r["colour"], r["shape"]) not in seen:
            seen.add((r["colour"], r["shape"]))
            chosen.append(r["file"])
    for name in os.listdir(folder):
        if name.endswith(".jpg") and name not in chosen:
            os.remove(folder / name)
    variants = {}
    for name in chosen[:4]:
        img = Image.open(folder / name)
        stem = name[:-4]
        img.resize((96, 96)).save(folder / f"{stem}_resized.png")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=35)
        (folder / f"{stem}_recompressed.jpg").write_bytes(buf.getvalue())
        w, h = img.size
        img.crop((3, 3, w - 3, h - 3)).save(folder / f"{stem}_cropped.png")
        variants[stem] = {name, f"{stem}_resized.png", f"{stem}_recompressed.jpg", f"{stem}_cropped.png"}
    settings = Settings(host="127.0.0.1", index_port=free_port(), search_port=free_port(), model=DEMO_MODEL_DIR,
                        device="cpu", workspace=str(tmp_path / "ws"))
    with flows_in_subprocess(settings):
        client = ClipseekClient(settings.index_address, settings.search_address)
        client.index([str(folder)])
        groups = client.duplicates(threshold=0.97)
    found = [{os.path.basename(h.uri) for h in g} for g in groups]
    for stem, expected in variants.items():
        group = next((g for g in found if stem + ".jpg" in g), set())
        assert expected <= group, (stem, group)
    print(f"{len(groups)} groups; sizes {[len(g) for g in found]}")
