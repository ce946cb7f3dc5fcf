"""Moments of videos: which frames are kept, damaged files, and how the store keeps a video as one source."""

import io

import numpy as np
import pytest
from PIL import Image

from clipseek.demo import world
from executors.images.imaging import ImageError
from executors.images.video import (frame_at, is_media_file, looks_like_video, moment_uri, split_moment,
                                    video_moments)
from executors.store.vector_store import Record, VectorStore


def _shots(seed: int, n: int):
    return [scene for scene, _ in world.scenes(seed, n)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """12 s at 10 fps: three shots of 4 s each, so two cuts (at 4 and 8 s)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    shots = world.write_video(str(path), [(s, 4) for s in _shots(3, 3)], size=(240, 240))
    return path, shots


def test_a_moment_per_shot_at_its_cut(clip):
    path, shots = clip
    found = video_moments(path.read_bytes(), "clip.mp4")
    times = [m.t for m in found.moments]
    assert len(times) == 3, times  # no shot is longer than the 5 s spacing: one moment per shot
    for t, shot in zip(times, shots):
        assert shot["start"] <= t < shot["start"] + 0.5, (times, shots)
    assert found.duration == pytest.approx(12.0, abs=0.2) and found.frames_decoded == 120 and found.damaged is None
    assert (found.width, found.height) == (240, 240)
    colours = [tuple(np.asarray(m.image)[:4, :4].reshape(-1, 3).mean(0).round()) for m in found.moments]
    assert len(set(colours)) == 3  # three different pictures, not one frame thrice


def test_still_video_gets_a_moment_every_spacing_and_at_most_the_bound(tmp_path):
    path = tmp_path / "still.mp4"
    world.write_video(str(path), [(_shots(5, 1)[0], 30)], fps=5, size=(96, 96))
    times = [m.t for m in video_moments(path.read_bytes(), spacing=5.0).moments]
    assert times == pytest.approx([0, 5, 10, 15, 20, 25], abs=0.25)
    bounded = [m.t for m in video_moments(path.read_bytes(), spacing=1.0, max_moments=4).moments]
    assert len(bounded) == 4 and bounded[0] == 0 and bounded[-1] >= 24  # spread over the whole video
    gaps = np.diff(bounded)
    assert gaps.max() - gaps.min() <= 2.5, bounded  # evenly


def test_truncated_video_keeps_what_was_read_and_garbage_is_refused(tmp_path):
    webm = tmp_path / "cut.webm"
    world.write_video(str(webm), [(s, 3) for s in _shots(3, 3)], size=(96, 96), codec="libvpx-vp9")
    data = webm.read_bytes()
    cut = video_moments(data[: len(data) // 2], "cut.webm")
    assert cut.damaged and 1 <= len(cut.moments) < 3  # the first shot (and maybe the second) survive
    with pytest.raises(ImageError, match=r"nothing.mp4: cannot (open|decode) video"):
        video_moments(np.random.default_rng(0).bytes(4000), "nothing.mp4")
    with pytest.raises(ImageError, match="empty file"):
        video_moments(b"", "empty.mp4")


def test_mp4_without_its_index_is_reported_by_name(clip):
    path, _ = clip
    data = path.read_bytes()  # PyAV writes the index (moov) at the end: a cut file has none
    with pytest.raises(ImageError, match=r"^half.mp4: cannot (open|decode) video"):
        video_moments(data[: len(data) // 2], "half.mp4")


def test_video_is_told_from_pictures_by_content_and_name(clip, tmp_path):
    path, _ = clip
    assert looks_like_video(path.read_bytes())
    webm = tmp_path / "a.webm"
    world.write_video(str(webm), [(_shots(1, 1)[0], 1)], size=(64, 64), codec="libvpx-vp9")
    assert looks_like_video(webm.read_bytes())
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt)
        assert not looks_like_video(buf.getvalue()), fmt
    # HEIF still pictures share the mp4 box layout; their brands mark them as pictures
    assert not looks_like_video(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    assert not looks_like_video(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1")
    assert all(is_media_file(f"x.{e}") for e in ("mp4", "MOV", "m4v", "webm", "mkv", "avi", "jpg"))
    assert not is_media_file("notes.txt")


def test_moment_uri_round_trips_and_frame_at_shows_that_moment(clip):
    path, shots = clip
    uri = moment_uri(str(path), 4.5)
    assert uri == f"{path}#t=4.5" and split_moment(uri) == (str(path), 4.5)
    assert split_moment("/photos/a.jpg#t=3") == ("/photos/a.jpg#t=3", None)  # only videos have moments
    data = path.read_bytes()
    moments = video_moments(data).moments
    for m in moments:
        shown = np.asarray(frame_at(data, m.t).resize(m.image.size), dtype=np.float32)
        assert np.abs(shown - np.asarray(m.image, dtype=np.float32)).mean() < 12  # the same picture
    other = np.asarray(frame_at(data, moments[2].t).resize(moments[0].image.size), dtype=np.float32)
    assert np.abs(other - np.asarray(moments[0].image, dtype=np.float32)).mean() > 12  # negative control


# ---- the store keeps a video's moments as one source --------------------------------------------------------

def _unit_rows(n, seed):
    v = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _moments(video_id, uri, times, **facts):
    return [Record(id=f"{video_id}#t={t:g}", uri=uri, source=video_id, t=float(t), **facts) for t in times]


def test_store_replaces_deletes_finds_and_ranks_a_video_as_one_source(tmp_path):
    store = VectorStore(str(tmp_path / "s"))
    try:
        vectors = _unit_rows(5, 0)
        store.upsert(vectors[:3], _moments("vid", "/v/clip.mp4", [0, 4, 8], size=10), replace_sources=True)
        store.upsert(vectors[3:], [Record(id="p1", uri="/p/1.jpg"), Record(id="p2", uri="/p/2.jpg")])
        assert store.count == 5
        # a query near moment 4 s: the video once, at that moment, then the pictures
        hits = store.search(vectors[1] + 0.01 * vectors[0], limit=3, one_per_source=True)[0]
        assert [r.id for r, _ in hits][:1] == ["vid#t=4"] and len(hits) == 3
        assert sum(1 for r, _ in hits if r.source == "vid") == 1
        every = store.search(vectors[1], limit=5)[0]
        assert sum(1 for r, _ in every if r.source == "vid") == 3
        # the video's id finds it (the client asks whether a file is indexed by the file's id)
        assert store.get(["vid"])["vid"].size == 10 and "nope" not in store.get(["nope"])
        assert store.update_tags({"vid": {"album": "trip"}}) == ["vid"]
        assert all(r.tags == {"album": "trip"} for _, r in store.iter_records() if r.source == "vid")
        # re-indexed after it changed: its new moments are all it has
        store.upsert(_unit_rows(2, 1), _moments("vid", "/v/clip.mp4", [0, 6], size=11), replace_sources=True)
        assert sorted(r.id for _, r in store.iter_records() if r.source == "vid") == ["vid#t=0", "vid#t=6"]
        # written in parts (a snapshot restore): the parts add up
        store.upsert(_unit_rows(1, 2), _moments("vid", "/v/clip.mp4", [9]))
        assert store.count == 5
        assert store.delete(["vid"]) == 3 and store.count == 2
    finally:
        store.close()


def test_moments_of_one_video_are_not_duplicates_of_each_other(tmp_path):
    store = VectorStore(str(tmp_path / "s"))
    try:
        same = np.tile(_unit_rows(1, 0), (3, 1))
        store.upsert(same[:2], _moments("vid", "/v/clip.mp4", [0, 5]), replace_sources=True)
        assert store.near_duplicates(0.99) == []
        store.upsert(same[2:], [Record(id="copy", uri="/p/frame.png")])  # a picture equal to a moment is one
        groups = store.near_duplicates(0.99)
        assert len(groups) == 1 and "copy" in {r.id for r, _ in groups[0]}
    finally:
        store.close()


def test_one_upsert_refuses_two_pictures_under_one_uri(tmp_path):
    store = VectorStore(str(tmp_path / "s"))
    try:
        from executors.store.vector_store import StoreError

        with pytest.raises(StoreError, match="uris must be unique"):
            store.upsert(_unit_rows(2, 0), [Record(id="a", uri="/p/x.jpg"), Record(id="b", uri="/p/x.jpg")])
        with pytest.raises(StoreError, match="uris must be unique"):
            store.upsert(_unit_rows(2, 0), [Record(id=i, uri="/v/c.mp4", source="vid", t=1.0) for i in ("a", "b")])
    finally:
        store.close()


def test_a_snapshot_keeps_a_video_as_one_source_even_across_its_batches(tmp_path, monkeypatch):
    from executors.store import snapshot

    store = VectorStore(str(tmp_path / "s"))
    try:
        store.upsert(_unit_rows(5, 0), _moments("vid", "/v/clip.mp4", [0, 4, 8, 12, 16]), model="m",
                     replace_sources=True)
        store.upsert(_unit_rows(1, 1), [Record(id="p", uri="/p/1.jpg")], model="m")
        snapshot.create(store, str(tmp_path / "snap.zip"))
    finally:
        store.close()
    monkeypatch.setattr(snapshot, "BATCH", 2)  # the video's moments arrive in three upserts
    snapshot.restore(str(tmp_path / "snap.zip"), str(tmp_path / "restored"))
    restored = VectorStore(str(tmp_path / "restored"))
    try:
        moments = sorted((r.t, r.id) for _, r in restored.iter_records() if r.source == "vid")
        assert moments == [(0.0, "vid#t=0"), (4.0, "vid#t=4"), (8.0, "vid#t=8"), (12.0, "vid#t=12"), (16.0, "vid#t=16")]
        assert restored.count == 6 and restored.delete(["vid"]) == 5
    finally:
        restored.close()


def test_plot_draws_the_frame_of_a_moment(clip, tmp_path, caplog):
    import logging

    from clipseek.plotting import plot_hits
    from executors.docs import Hit

    path, shots = clip
    hits = [Hit(id=f"v:t{s['start']:g}", uri=moment_uri(str(path), s["start"] + 1), score=0.5, t=s["start"] + 1)
            for s in shots]
    with caplog.at_level(logging.WARNING, logger="clipseek.plotting"):
        fig = plot_hits("a moment", hits, str(tmp_path / "plot.png"))
    assert "cannot show" not in caplog.text
    shown = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(shown) == 3
    means = [tuple(np.asarray(a, dtype=np.float32).reshape(-1, 3).mean(0).round()) for a in shown]
    assert len(set(means)) == 3  # each panel shows its own moment's frame
