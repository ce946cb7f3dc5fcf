"""Train the small demo CLIP on the generated picture world, on the CPU, and evaluate it.

    python -m clipseek.demo.train --minutes 12 --out data/models/clipseek-demo

Pictures go through the same ``executors.images.imaging.preprocess`` the encoder uses at serving
time. Captions name some or all of a scene's attributes; the contrastive loss treats every
picture that fits a caption as a positive for it (soft targets), so the many pictures
that share a caption do not fight each other.
"""

import argparse
import json
import logging
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np

from executors.images.imaging import Preprocess, preprocess
from executors.models.loading import features, image_processor_config
from clipseek.demo import world

logger = logging.getLogger(__name__)

ATTRS = ("colour", "shape", "size", "count", "background", "position")
VALUES = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "size": list(world.SIZES),
          "count": list(world.COUNTS), "background": list(world.BACKGROUNDS), "position": list(world.POSITIONS)}

MODEL_SHAPE = dict(image_size=64, patch_size=8, width=128, layers=4, projection_dim=64)
FILE_SIZE = 128  # pixels of the demo files; the model sees them resized to MODEL_SHAPE["image_size"]


def scene_codes(scene: world.Scene) -> List[int]:
    return [VALUES[a].index(getattr(scene, a)) for a in ATTRS]


def _render_chunk(args):
    seed, n, recipe = args
    pixels, codes = [], []
    for scene, rng in world.scenes(seed, n):
        pixels.append(preprocess(world.render(scene, rng, FILE_SIZE), recipe).astype(np.float16))
        codes.append(scene_codes(scene))
    return np.stack(pixels), np.array(codes, dtype=np.int64)


def render_pool(seed: int, n: int, recipe: Preprocess, workers: int = 2):
    """Pre-rendered, preprocessed pictures (float16) and their attribute codes."""
    chunks = [(seed * 1000 + i, n // workers + (1 if i < n % workers else 0), recipe) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render_chunk, chunks))
    return np.concatenate([p for p, _ in parts]), np.concatenate([c for _, c in parts])


def caption_for(codes: Sequence[int], rng: random.Random):
    """A caption naming a random subset of the attributes, and the mask of what it names."""
    scene = world.Scene(*[VALUES[a][c] for a, c in zip(ATTRS, codes)])
    mention = {"colour": rng.random() < 0.93, "shape": rng.random() < 0.93, "size": rng.random() < 0.6,
               "count": rng.random() < 0.6, "background": rng.random() < 0.45, "position": rng.random() < 0.25}
    if not (mention["colour"] or mention["shape"]):
        mention["shape"] = True
    noun = scene.shape if scene.count == 1 or not mention["count"] else world.PLURAL[scene.shape]
    if not mention["shape"]:
        noun = "shape" if scene.count == 1 or not mention["count"] else "shapes"
    words = []
    if mention["count"]:
        words.append("a" if scene.count == 1 else world.COUNTS[scene.count])
    elif rng.random() < 0.5:
        words.append("a")
    if mention["size"]:
        words.append(scene.size)
    if mention["colour"]:
        words.append(scene.colour)
    words.append(noun)
    if mention["position"]:
        words.append("in the middle" if scene.position == "middle" else f"at the {scene.position}")
    if mention["background"]:
        words.append(f"on a {scene.background} background")
    prefix = rng.choice(["", "", "a photo of ", "a picture of ", "an image of "])
    text = prefix + " ".join(w for w in words if w)
    return text, [mention[a] for a in ATTRS]


def positives(caption_codes, caption_mask, image_codes):
    """(captions x images) bool: the image fits everything the caption names."""
    eq = caption_codes[:, None, :] == image_codes[None, :, :]
    return (eq | ~caption_mask[:, None, :]).all(dim=-1)


def evaluate(model, tokenizer, pixels, codes, attributes=world.ATTRIBUTES, ks=(1, 5), input_dtype=None) -> Dict[str, float]:
    """Text->image retrieval over held-out pictures with full captions (without position) as queries
    (``input_dtype``: the pixels' dtype for a model in another precision than float32)."""
    import torch

    input_dtype = input_dtype or torch.float32

    attr_idx = [ATTRS.index(a) for a in attributes]
    with torch.inference_mode():
        img = []
        for start in range(0, len(pixels), 256):
            out = model.get_image_features(pixel_values=torch.from_numpy(pixels[start:start + 256].astype(np.float32)).to(input_dtype))
            img.append(features(out).float())
        img = torch.nn.functional.normalize(torch.cat(img), dim=-1)
        keys = sorted({tuple(c[attr_idx]) for c in codes})
        queries = []
        for key in keys:
            full = next(c for c in codes if tuple(c[attr_idx]) == key)
            scene = world.Scene(*[VALUES[a][c] for a, c in zip(ATTRS, full)])
            queries.append(scene.caption(with_background="background" in attributes))
        tok = tokenizer(queries, padding=True, return_tensors="pt")
        out = model.get_text_features(**tok)
        txt = torch.nn.functional.normalize(features(out).float(), dim=-1)
        scores = txt @ img.T
        relevant = torch.tensor([[tuple(c[attr_idx]) == key for c in codes] for key in keys])
        order = scores.argsort(dim=1, descending=True)
        ranked_rel = torch.gather(relevant, 1, order)
        result = {f"recall@{k}": ranked_rel[:, :k].any(dim=1).float().mean().item() for k in ks}
        n_rel = relevant.sum(dim=1).clamp(max=5).float()
        result["precision@5"] = (ranked_rel[:, :5].sum(dim=1).float() / n_rel).clamp(max=1).mean().item()
        result["queries"] = len(keys)
        # compositional: "a red circle": the best picture must be red and a circle
        comp_keys = sorted({(c[0], c[1]) for c in codes})
        comp_queries = [f"a {VALUES['colour'][c]} {VALUES['shape'][s]}" for c, s in comp_keys]
        tok = tokenizer(comp_queries, padding=True, return_tensors="pt")
        out = model.get_text_features(**tok)
        ctxt = torch.nn.functional.normalize(features(out).float(), dim=-1)
        best = (ctxt @ img.T).argmax(dim=1)
        result["colour+shape top-1"] = float(np.mean([tuple(codes[b][:2]) == k for b, k in zip(best.tolist(), comp_keys)]))
    return result


def train(out_dir: str, minutes: float = 12.0, seed: int = 0, pool_size: int = 24000, batch_size: int = 256,
          lr: float = 1e-3, max_steps: Optional[int] = None, eval_size: int = 600, threads: int = 2,
          log=print) -> Dict[str, float]:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from clipseek.demo.modelkit import make_tiny_clip, save_clip_folder

    torch.set_num_threads(threads)
    started = time.time()
    tmp = out_dir.rstrip("/") + ".init"
    make_tiny_clip(tmp, words=world.all_words() + ["shape", "shapes"], seed=seed, **MODEL_SHAPE)
    tokenizer = CLIPTokenizer.from_pretrained(tmp)
    model = CLIPModel.from_pretrained(tmp)
    recipe = Preprocess.from_processor_config(image_processor_config(tmp))
    pixels, codes = render_pool(seed + 1, pool_size, recipe, workers=threads)
    eval_pixels, eval_codes = render_pool(seed + 99, eval_size, recipe, workers=threads)
    log(f"rendered {len(pixels)} training and {len(eval_pixels)} held-out pictures in {time.time() - started:.0f} s")

    torch.set_grad_enabled(True)  # a process that served models before may have switched it off
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=lr)
    rng = random.Random(seed)
    budget = minutes * 60 - (time.time() - started) - 30
    step, t_train, total_steps = 0, time.time(), max_steps or 10**9
    codes_t = torch.from_numpy(codes)
    while step < total_steps:
        elapsed = time.time() - t_train
        if max_steps is None and step == 20:
            total_steps = max(40, int(budget / (elapsed / 20)))
            log(f"{elapsed / 20:.2f} s/step: training {total_steps} steps")
        if max_steps is None and elapsed > budget:
            break
        warm = min(1.0, (step + 1) / 100)
        progress = step / max(1, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        idx = torch.from_numpy(np.random.default_rng(seed + step).choice(len(pixels), batch_size, replace=False))
        batch_px = torch.from_numpy(pixels[idx.numpy()].astype(np.float32))
        caps, masks = zip(*(caption_for(codes[i], rng) for i in idx.tolist()))
        tok = tokenizer(list(caps), padding=True, return_tensors="pt")
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=batch_px)
        logits = out.logits_per_text  # (captions, images)
        pos = positives(codes_t[idx], torch.tensor(masks), codes_t[idx]).float()
        loss_t = -(torch.log_softmax(logits, dim=1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss_i = -(torch.log_softmax(logits.T, dim=1) * pos.T / pos.T.sum(1, keepdim=True)).sum(1).mean()
        loss = (loss_t + loss_i) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"elapsed {time.time() - started:.0f} s")
        step += 1
    model.eval()
    metrics = evaluate(model, tokenizer, eval_pixels, eval_codes)
    metrics.update(steps=step, seconds=round(time.time() - started, 1), images_seen=step * batch_size)
    save_clip_folder(out_dir, model, tokenizer, MODEL_SHAPE["image_size"])
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump({"metrics": metrics, "model_shape": MODEL_SHAPE, "pool_size": pool_size, "batch_size": batch_size,
                   "seed": seed, "lr": lr}, f, indent=2)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out_dir}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m clipseek.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("data", "models", "clipseek-demo"))
    p.add_argument("--minutes", type=float, default=12.0, help="wall-clock budget, rendering included")
    p.add_argument("--steps", type=int, help="train exactly this many steps instead")
    p.add_argument("--pool", type=int, default=24000, help="training pictures rendered up front")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train(args.out, minutes=args.minutes, seed=args.seed, pool_size=args.pool, batch_size=args.batch_size,
          max_steps=args.steps)


if __name__ == "__main__":
    main()
