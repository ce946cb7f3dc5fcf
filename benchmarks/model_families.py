"""CPU cost per model family: the image tower's images/s and one text query's ms, in float32 and bfloat16,
through the encoders' own path (``load_clip`` + ``image_embeddings`` / ``text_embeddings``).

- CLIP ViT-B/32 shape (transformers ``CLIPConfig()`` defaults: 224 px, patch 32, texts padded to the
  longest of the batch);
- SigLIP base shape (``SiglipConfig()`` defaults, as google/siglip-base-patch16-224 and
  google/siglip2-base-patch16-224: 224 px, patch 16, so 196 image tokens against CLIP's 49, and every
  text padded to 64 tokens).

    python benchmarks/model_families.py                          # both families, float32 and bfloat16
    python benchmarks/model_families.py --precisions float32 --images 16

Random weights and an offline BPE tokenizer, built once into the --work-dir: the speed is that of the
real models, the embeddings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import Results, image_rate, options_of  # noqa: E402  (sets sys.path and offline env)
from clipseek.demo.modelkit import BOS, EOS, make_vit_b32, train_tokenizer  # noqa: E402

QUERY = "a photo of a dog running on the beach at sunset"


def make_siglip_base(folder: str, seed: int = 0) -> str:
    """``SiglipConfig()`` defaults (SigLIP base, patch 16, 224 px), random weights, an offline BPE tokenizer
    and a SiglipImageProcessor, saved so ``from_pretrained(folder)`` loads it like a hub model."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import shutil

    import torch
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    tmp = folder + "_partial"  # renamed to ``folder`` when complete: a half-made folder is never reused
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(tmp, [])
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = SiglipConfig(text_config=dict(  # the defaults, with this tokenizer's special tokens
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos))
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(tmp)
    size = config.vision_config.image_size
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def query_ms(clip, repeat: int, warmup: int = 3) -> float:
    """Median ms of one text query (tokenize + text tower + L2 norm), as the search flow embeds it."""
    from executors.models.loading import text_embeddings

    for _ in range(warmup):
        text_embeddings(clip, [QUERY])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        text_embeddings(clip, [QUERY])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images per timing of the image tower (default 32)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--queries", type=int, default=20, help="timed text queries (default 20)")
    parser.add_argument("--precisions", default="float32,bfloat16", help="precisions to compare (default float32,bfloat16)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clipseek-bench"),
                        help="where the random models are built once (default /tmp/clipseek-bench)")
    args = parser.parse_args()

    from executors.models.loading import load_clip

    import torch

    report = Results(__file__, options_of(args))
    families = [("CLIP ViT-B/32", make_vit_b32(os.path.join(args.work_dir, "vit-b32-random"))),
                ("SigLIP base p16-224", make_siglip_base(os.path.join(args.work_dir, "siglip-base-p16-224-random")))]
    rows = []
    for label, folder in families:
        for name in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            clip = load_clip(folder, "cpu", name, with_tokenizer=True)
            rows.append([label, clip.precision, clip.text_padding, f"{image_rate(clip, args.batch_size, args.images):.2f}",
                         f"{query_ms(clip, args.queries):.2f}"])
            print(f"  {label} {clip.precision}: done", flush=True)
    report.table(f"Image tower and one text query by model family: cpu, {torch.get_num_threads()} torch threads, "
                 f"batch {args.batch_size}, {args.images} images per timing, {args.queries} queries",
                 ["model", "precision", "text padding", "images/s", "text query ms (p50)"], rows)
    report.write()


if __name__ == "__main__":
    main()
