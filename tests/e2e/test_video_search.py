"""Search inside videos through the CLI and the client, with the shipped demo model: the right video and
moment is found, a video is one source for re-indexing, delete and prune, and a damaged video is reported."""

import io
import json
import os

import numpy as np
import pytest

from clipseek.client import ClipseekClient
from clipseek.demo import world
from flows.serving import free_port
from flows.settings import DEMO_MODEL_DIR

from .test_cli import Server, _env, _run

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")),
                                reason="the demo model is not in data/models")


def _distinct_scenes(n: int, seed: int = 11):
    """``n`` scenes that differ in colour and shape, so that each caption names one of them only."""
    picked, seen = [], set()
    for scene, _ in world.scenes(seed, 200):
        if scene.colour not in {c for c, _ in seen} and scene.shape not in {s for _, s in seen}:
            picked.append(scene)
            seen.add((scene.colour, scene.shape))
        if len(picked) == n:
            return picked
    raise AssertionError("not enough distinct scenes")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ws")
    env = _env(DEMO_MODEL_DIR, workspace, (free_port(), free_port()))
    server = Server(env)
    try:
        yield env
    finally:
        server.stop()


def test_finds_the_moment_inside_the_video(served, tmp_path):
    env = served
    assert _run(["clear", "--yes"], env).returncode == 0
    a, b, c, d, e = _distinct_scenes(5)
    folder = tmp_path / "media"
    folder.mkdir()
    video = folder / "holiday.mp4"
    shots = world.write_video(str(video), [(a, 3), (b, 4), (c, 3)], size=(224, 224))
    for i, scene in enumerate((d, e)):
        world.render(scene, world.random.Random(i), size=128).save(folder / f"photo{i}.jpg", quality=92)
    out = _run(["index", str(folder)], env)
    assert "indexed 3, unchanged 0 (skipped), failed 0" in out.stdout, out.stdout + out.stderr

    hits = json.loads(_run(["search", b.caption(), "--json"], env).stdout)
    top = hits[0]
    assert top["uri"].startswith(f"{video}#t=") and float(top["uri"].rsplit("=", 1)[1]) == top["t"]
    assert shots[1]["start"] - 1 <= top["t"] <= shots[1]["end"], (top, shots)  # within a second of the shot
    assert sum(1 for h in hits if h["uri"].startswith(str(video))) == 1  # the video's best moment only
    every = json.loads(_run(["search", b.caption(), "--all-moments", "--json"], env).stdout)
    assert sum(1 for h in every if h["uri"].startswith(str(video))) == 3  # one moment per shot

    with ClipseekClient(f"grpc://127.0.0.1:{env['CLIPSEEK_INDEX_PORT']}",
                        f"grpc://127.0.0.1:{env['CLIPSEEK_SEARCH_PORT']}") as client:
        first = client.search(c.caption(), limit=1)[0]
        assert first.uri.startswith(f"{video}#t=") and shots[2]["start"] - 1 <= first.t <= shots[2]["end"]
        assert client.status().count == 5  # three moments and two photos

        # unchanged: skipped as one file; changed: its new moments replace all the old ones
        again = client.index([str(folder)])
        assert len(again.unchanged) == 3 and not again.indexed
        world.write_video(str(video), [(d, 2), (a, 2)], size=(224, 224))
        changed = client.index([str(video)])
        assert changed.indexed == [str(video)], changed
        assert client.status().count == 4  # two moments now
        moments = [h for h in client.search(b.caption(), limit=10, all_moments=True) if h.uri.startswith(str(video))]
        assert len(moments) == 2 and all(h.t < 3 for h in moments), moments  # the old moments at 3-10 s are gone

        # deleted from disk: --prune removes every moment
        video.unlink()
        pruned = _run(["index", str(folder), "--prune"], env)
        assert "pruned 2 (files gone)" in pruned.stdout, pruned.stdout
        assert client.status().count == 2


def test_a_damaged_video_is_reported_and_the_rest_indexed(served, tmp_path):
    env = served
    assert _run(["clear", "--yes"], env).returncode == 0
    a, b, c = _distinct_scenes(3, seed=5)
    folder = tmp_path / "media"
    folder.mkdir()
    good = folder / "good.mp4"
    world.write_video(str(good), [(a, 2), (b, 2)], size=(160, 160))
    data = good.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])  # its index (moov) is at the end: unreadable
    webm = folder / "cut.webm"
    world.write_video(str(webm), [(b, 2), (c, 2), (a, 2)], size=(160, 160), codec="libvpx-vp9")
    cut = webm.read_bytes()
    webm.write_bytes(cut[: len(cut) // 2])  # a truncated WebM keeps the moments before the cut
    (folder / "empty.mkv").write_bytes(b"")
    out = _run(["index", str(folder)], env)
    assert out.returncode == 1
    assert "indexed 2, unchanged 0 (skipped), failed 2" in out.stdout, out.stdout
    assert f"failed: {folder / 'cut.mp4'}: cannot open video" in out.stdout
    assert f"failed: {folder / 'empty.mkv'}: empty file" in out.stdout
    hits = json.loads(_run(["search", b.caption(), "--all-moments", "--json"], env).stdout)
    assert {h["uri"].split("#")[0] for h in hits} == {str(good), str(webm)}


def test_web_page_shows_the_moment_and_plays_the_video_from_it(served, tmp_path):
    import urllib.error
    import urllib.request

    from PIL import Image

    from clipseek.web import create_app, serve_in_thread

    env = served
    assert _run(["clear", "--yes"], env).returncode == 0
    a, b = _distinct_scenes(2, seed=3)
    folder = tmp_path / "media"
    folder.mkdir()
    video = folder / "walk.mp4"
    shots = world.write_video(str(video), [(a, 3), (b, 3)], size=(224, 224))
    assert "indexed 1," in _run(["index", str(folder)], env).stdout
    client = ClipseekClient(f"grpc://127.0.0.1:{env['CLIPSEEK_INDEX_PORT']}",
                            f"grpc://127.0.0.1:{env['CLIPSEEK_SEARCH_PORT']}")
    with serve_in_thread(create_app(client), "127.0.0.1", free_port()) as server:
        base = server.url.rstrip("/")
        request = urllib.request.Request(f"{base}/api/search", data=json.dumps(
            {"text": b.caption(), "limit": 1}).encode(), headers={"Content-Type": "application/json"})
        hit = json.loads(urllib.request.urlopen(request, timeout=60).read())["hits"][0]
        assert shots[1]["start"] - 1 <= hit["t"] <= shots[1]["end"] and hit["name"] == "walk.mp4"
        assert hit["video"].endswith(f"#t={hit['uri'].rsplit('=', 1)[1]}")
        thumb = Image.open(io.BytesIO(urllib.request.urlopen(base + hit["thumb"], timeout=60).read()))
        frame = world.render(b, world.random.Random(0), size=224)
        shown = np.asarray(thumb.convert("RGB").resize((64, 64)), dtype=np.float32)
        other = np.asarray(world.render(a, world.random.Random(0), size=224).resize((64, 64)), dtype=np.float32)
        # the thumbnail is the frame of that moment: its background and colours, not the other shot's
        assert np.abs(shown - np.asarray(frame.resize((64, 64)), dtype=np.float32)).mean() < \
            np.abs(shown - other).mean()
        played = urllib.request.urlopen(urllib.request.Request(base + hit["video"].split("#")[0],
                                                               headers={"Range": "bytes=0-99"}), timeout=60)
        assert played.status == 206 and played.headers["Content-Type"] == "video/mp4"
        assert played.read() == video.read_bytes()[:100]
        with pytest.raises(urllib.error.HTTPError) as refused:  # a picture id is no video
            urllib.request.urlopen(f"{base}/api/video/{hit['id'].split(':')[0]}", timeout=60)
        assert refused.value.code == 404
        os.utime(video, (1, 1))  # touched since it was indexed: not the video of that id any more
        with pytest.raises(urllib.error.HTTPError) as changed:
            urllib.request.urlopen(base + hit["video"].split("#")[0], timeout=60)
        assert changed.value.code == 404 and "not the video that was indexed" in changed.value.read().decode()
    client.close()


def test_web_page_date_range_and_newest_first(served, tmp_path):
    import urllib.error
    import urllib.request

    from clipseek.web import create_app, serve_in_thread
    from tests.unit.test_when_and_where import exif_jpeg

    env = served
    assert _run(["clear", "--yes"], env).returncode == 0
    folder = tmp_path / "trip"
    folder.mkdir()
    for name, taken in (("2018", "2018:05:01 10:00:00"), ("2019a", "2019:07:04 10:00:00"),
                        ("2019b", "2019:08:20 10:00:00"), ("2020", "2020:01:01 10:00:00")):
        exif_jpeg(folder / f"{name}.jpg", original=taken, colour=(220, 30, 30))
    assert "indexed 4," in _run(["index", str(folder)], env).stdout
    client = ClipseekClient(f"grpc://127.0.0.1:{env['CLIPSEEK_INDEX_PORT']}",
                            f"grpc://127.0.0.1:{env['CLIPSEEK_SEARCH_PORT']}")

    def ask(base, **body):
        request = urllib.request.Request(f"{base}/api/search", data=json.dumps({"text": "a red square", **body}).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())["hits"]

    with serve_in_thread(create_app(client), "127.0.0.1", free_port()) as server:
        base = server.url.rstrip("/")
        summer = ask(base, after="2019-06-01", before="2019-09-01")
        assert sorted(h["name"] for h in summer) == ["2019a.jpg", "2019b.jpg"]
        newest = ask(base, sort="date", limit=3)
        by_score = ask(base, limit=3)
        assert {h["id"] for h in newest} == {h["id"] for h in by_score}
        assert [h["taken"] for h in newest] == sorted((h["taken"] for h in newest), reverse=True)
        with pytest.raises(urllib.error.HTTPError) as bad:
            ask(base, after="last summer")
        assert bad.value.code == 400 and "after must be a date as YYYY-MM-DD" in bad.value.read().decode()
        page = urllib.request.urlopen(base + "/", timeout=60).read().decode()
        assert 'id="after"' in page and 'id="before"' in page and '<option value="date">' in page
    client.close()


def test_with_two_shards_a_video_lives_on_one_shard(tmp_path):
    """Every moment of a video is kept by the shard its video's id hashes to: re-indexed after a change, the
    video's moments are replaced there, never copied to the other shard."""
    from executors.images.video import video_moments
    from executors.simple_indexer import shard_of
    from executors.store.vector_store import VectorStore

    workspace = tmp_path / "ws"
    env = _env(DEMO_MODEL_DIR, workspace, (free_port(), free_port()))
    a, b, c = _distinct_scenes(3, seed=8)
    folder = tmp_path / "media"
    folder.mkdir()
    videos = [folder / f"v{i}.mp4" for i in range(4)]
    for i, video in enumerate(videos):
        world.write_video(str(video), [(a, 2), (b, 2)] if i % 2 else [(c, 2)], size=(128, 128), seed=i)
    server = Server(env, ["--shards", "2"])
    try:
        assert "indexed 4," in _run(["index", str(folder)], env).stdout
        for video in videos[:2]:  # changed: now three shots each
            world.write_video(str(video), [(a, 2), (b, 2), (c, 2)], size=(128, 128), seed=9)
        assert "indexed 2, unchanged 2" in _run(["index", str(folder)], env).stdout
        status = _run(["status", "--json"], env)
        moments = sum(len(video_moments(v.read_bytes()).moments) for v in videos)
        assert json.loads(status.stdout)["count"] == moments, status.stdout  # each moment once, no stale copy
    finally:
        server.stop()
    from executors.images.imaging import uri_id

    owner = {uri_id(str(v)): shard_of(uri_id(str(v)), 2) for v in videos}
    for shard in (0, 1):
        store = VectorStore(str(workspace / "SimpleIndexer" / str(shard)), read_only=True)
        try:
            sources = [r.source for _, r in store.iter_records()]
        finally:
            store.close()
        assert all(owner[s] == shard for s in sources), (shard, sources)


def test_video_spacing_and_moment_bound_flags(served, tmp_path):
    env = served
    assert _run(["clear", "--yes"], env).returncode == 0
    (a,) = _distinct_scenes(1, seed=2)
    video = tmp_path / "still.mp4"
    world.write_video(str(video), [(a, 6)], fps=5, size=(96, 96))
    assert "indexed 1," in _run(["index", str(video), "--video-spacing", "1"], env).stdout
    assert json.loads(_run(["status", "--json"], env).stdout)["count"] == 6  # one a second, still as it is
    assert "indexed 1," in _run(["index", str(video), "--force", "--max-moments", "2"], env).stdout
    assert json.loads(_run(["status", "--json"], env).stdout)["count"] == 2
    over = _run(["index", str(video), "--force", "--max-moments", "1000"], env)
    assert over.returncode != 0 and "max_moments" in (over.stdout + over.stderr), over.stdout + over.stderr
