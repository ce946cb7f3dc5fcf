"""Videos: how fast a 1080p H.264 clip is decoded, turned into moments and embedded.

A clip of the demo world at 1920x1080, 30 fps, H.264 (libx264), a new shot every few seconds, is written
once into the work folder. Measured side by side in one run:

- (d) PyAV decoding every frame, nothing else: the reference, what FFmpeg costs here;
- (m) ``video_moments``: the same decode, a scene check four times a second, each kept moment scaled down;
- (e) the CLIPImageEncoder on the file as ``clipseek index`` sends it (decode, moments, preprocess, model),
  with the ViT-B/32-shaped random model of the other benchmarks, in the precision ``auto`` picks.

Each figure is frames of the video per second of wall time (and seconds of video per second).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import Results, options_of  # noqa: E402  (sets sys.path and offline env)

from clipseek.demo import world  # noqa: E402
from clipseek.demo.modelkit import make_vit_b32  # noqa: E402


def make_clip(path: str, seconds: float, shot: float, fps: int, size) -> None:
    if os.path.exists(path):
        return
    shots, n = [], max(1, round(seconds / shot))
    for scene, _ in world.scenes(21, n):
        shots.append((scene, shot))
    world.write_video(path + ".part.mp4", shots, fps=fps, size=size)
    os.replace(path + ".part.mp4", path)


def decode_all(data: bytes) -> int:
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the clip (default 20 s)")
    parser.add_argument("--shot", type=float, default=4.0, help="seconds per shot (default 4)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, best kept (default 2)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"))
    args = parser.parse_args()

    from docarray import DocList

    from executors.clip_image_encoder import CLIPImageEncoder
    from executors.docs import ImageInput
    from executors.images.imaging import path_uri
    from executors.images.video import video_moments

    report = Results(__file__, options_of(args))
    os.makedirs(args.work_dir, exist_ok=True)
    clip_path = os.path.join(args.work_dir, f"clip-1080p-{args.seconds:g}s-{args.fps}fps-{args.shot:g}.mp4")
    t0 = time.perf_counter()
    make_clip(clip_path, args.seconds, args.shot, args.fps, (1920, 1080))
    data = open(clip_path, "rb").read()
    model_dir = make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))
    print(f"clip {clip_path}: {len(data) / 2**20:.1f} MiB, ready in {time.perf_counter() - t0:.0f} s", flush=True)

    def best(fn):
        times, out = [], None
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return out, min(times)

    frames, decode_s = best(lambda: decode_all(data))
    found, moments_s = best(lambda: video_moments(data, "clip.mp4"))
    encoder = CLIPImageEncoder(pretrained_model_name_or_path=model_dir, device="cpu")
    try:
        doc = lambda: DocList[ImageInput]([ImageInput(uri=path_uri(clip_path), url=path_uri(clip_path))])  # noqa: E731
        encoder.encode(doc())  # warm up
        done, encode_s = best(lambda: encoder.encode(doc()))
        kept = len(done[0].moments)
        precision = encoder._load(encoder.defaults).precision
    finally:
        encoder.close()
    seconds = frames / args.fps

    def row(label, wall, extra=""):
        return [label, f"{frames / wall:.1f}", f"{seconds / wall:.2f}", f"{decode_s / wall:.2f}", extra]

    report.table(
        f"1080p H.264 ({frames} frames, {seconds:.0f} s at {args.fps} fps, a shot every {args.shot:g} s), best of "
        f"{args.repeat}",
        ["stage", "frames/s", "video s per s", "x decode alone", "notes"],
        [row("(d) PyAV decode of every frame", decode_s),
         row("(m) video_moments: decode + scene checks + scaled moments", moments_s, f"{len(found.moments)} moments"),
         row("(e) CLIPImageEncoder: + preprocess + embed", encode_s, f"{kept} moments embedded, model in {precision}")],
        note="frames/s counts every frame of the video, decoded whether kept or not; moments are the frames kept "
             "and embedded.")
    report.write()


if __name__ == "__main__":
    main()
