"""Train the small demo CLIP on the generated picture world, on the CPU, and evaluate it.

    python -m clipseek.demo.train --minutes 40 --out data/models/clipseek-demo

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

MODEL_SHAPE = dict(image_size=96, patch_size=8, width=128, layers=4, projection_dim=64)
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
               "count": rng.random() < 0.75, "background": rng.random() < 0.45, "position": rng.random() < 0.25}
    if not (mention["colour"] or mention["shape"]):
        mention["shape"] = True
    noun = scene.shape if scene.count == 1 or not mention["count"] else world.PLURAL[scene.shape]
    if not mention["shape"]:
        noun = "shape" if scene.count == 1 or not mention["count"] else "shapes"
    words = []
    if mention["count"]:  # "a" always means one, as a user means it in "a red circle"
        words.append("a" if scene.count == 1 else world.COUNTS[scene.count])
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
        # "three yellow stars": the best picture must have that count, colour and shape
        count_idx = ATTRS.index("count")
        ccs_keys = sorted({(c[count_idx], c[0], c[1]) for c in codes})
        ccs_queries = []
        for n, c, s in ccs_keys:
            count = VALUES["count"][n]
            noun = VALUES["shape"][s] if count == 1 else world.PLURAL[VALUES["shape"][s]]
            ccs_queries.append(f"{'a' if count == 1 else world.COUNTS[count]} {VALUES['colour'][c]} {noun}")
        tok = tokenizer(ccs_queries, padding=True, return_tensors="pt")
        ctxt = torch.nn.functional.normalize(features(model.get_text_features(**tok)).float(), dim=-1)
        best = (ctxt @ img.T).argmax(dim=1)
        result["count+colour+shape top-1"] = float(np.mean(
            [(codes[b][count_idx], codes[b][0], codes[b][1]) == k for b, k in zip(best.tolist(), ccs_keys)]))
    return result


def hard_negative_batch(codes: np.ndarray, by_key: Dict[tuple, np.ndarray], batch_size: int,
                        rng: np.random.Generator, share: float = 0.5) -> np.ndarray:
    """Pool indices for one batch: random pictures, and for ``share`` of them a picture that differs in exactly
    one attribute (shape or count most often, else colour or size), so the loss must tell those apart."""
    anchors = rng.choice(len(codes), int(batch_size * (1 - share / 2)), replace=False)
    picked = list(anchors)
    seen = set(picked)
    changes = [ATTRS.index("shape")] * 2 + [ATTRS.index("count")] * 2 + [ATTRS.index("colour"), ATTRS.index("size")]
    for anchor in anchors:
        if len(picked) >= batch_size:
            break
        attr = changes[rng.integers(len(changes))]
        key = list(codes[anchor][:5])
        key[attr] = (key[attr] + 1 + rng.integers(len(VALUES[ATTRS[attr]]) - 1)) % len(VALUES[ATTRS[attr]])
        candidates = by_key.get(tuple(int(k) for k in key))
        if candidates is not None:
            choice = int(candidates[rng.integers(len(candidates))])
            if choice not in seen:
                seen.add(choice)
                picked.append(choice)
    while len(picked) < batch_size:  # topped up at random where a variant was missing
        choice = int(rng.integers(len(codes)))
        if choice not in seen:
            seen.add(choice)
            picked.append(choice)
    return np.array(picked)


def training_autocast(precision: str = "auto") -> bool:
    """Whether to train under bfloat16 autocast: ``auto`` does where the CPU runs bfloat16 natively
    (about 2x the steps per minute of float32 on a 2-core AVX-512 bf16 CPU), ``float32`` never, ``bfloat16`` always."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"training precision must be auto, float32 or bfloat16, not {precision!r}")
    if precision == "auto":
        from executors.models.precision import native_bfloat16

        return native_bfloat16() is not None
    return precision == "bfloat16"


def train(out_dir: str, minutes: float = 40.0, seed: int = 0, pool_size: int = 40000, batch_size: int = 256,
          lr: float = 1e-3, max_steps: Optional[int] = None, eval_size: int = 1000, threads: int = 2,
          hard_negatives: float = 0.5, model_shape: Optional[Dict[str, int]] = None, precision: str = "auto",
          log=print) -> Dict[str, float]:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    from clipseek.demo.modelkit import make_tiny_clip, save_clip_folder

    torch.set_num_threads(threads)
    autocast = training_autocast(precision)
    log(f"training in {'bfloat16 autocast' if autocast else 'float32'} (weights and optimizer stay float32)")
    started = time.time()
    tmp = out_dir.rstrip("/") + ".init"
    shape = {**MODEL_SHAPE, **(model_shape or {})}
    make_tiny_clip(tmp, words=world.all_words() + ["shape", "shapes"], seed=seed, **shape)
    tokenizer = CLIPTokenizer.from_pretrained(tmp)
    # torch's CPU flash-attention backward is slower in bfloat16 than in float32; plain matmul attention is not
    model = CLIPModel.from_pretrained(tmp, attn_implementation="eager" if autocast else None)
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
    by_key: Dict[tuple, list] = {}
    for i, c in enumerate(codes):
        by_key.setdefault(tuple(int(v) for v in c[:5]), []).append(i)
    by_key_arrays = {k: np.array(v) for k, v in by_key.items()}
    batch_rng = np.random.default_rng(seed)
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
        if hard_negatives > 0:
            idx = torch.from_numpy(hard_negative_batch(codes, by_key_arrays, batch_size, batch_rng, hard_negatives))
        else:
            idx = torch.from_numpy(batch_rng.choice(len(pixels), batch_size, replace=False))
        batch_px = torch.from_numpy(pixels[idx.numpy()].astype(np.float32))
        caps, masks = zip(*(caption_for(codes[i], rng) for i in idx.tolist()))
        tok = tokenizer(list(caps), padding=True, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=batch_px)
        logits = out.logits_per_text.float()  # (captions, images)
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
    save_clip_folder(out_dir, model, tokenizer, shape["image_size"])
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump({"metrics": metrics, "model_shape": shape, "pool_size": pool_size, "batch_size": batch_size,
                   "seed": seed, "lr": lr, "hard_negatives": hard_negatives, "eval_size": eval_size,
                   "precision": "bfloat16" if autocast else "float32"}, f, indent=2)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out_dir}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's options: the same for ``python -m clipseek.demo.train`` and ``clipseek train-demo-model``."""
    p.add_argument("--out", default=None, help="output folder (default data/models/clipseek-demo)")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget, rendering included (default 40)")
    p.add_argument("--steps", type=int, help="train exactly this many steps instead")
    p.add_argument("--pool", type=int, default=40000, help="training pictures rendered up front (default 40000)")
    p.add_argument("--batch-size", type=int, default=256, help="pictures per training step (default 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the rendered pictures and the batches (default 0)")
    p.add_argument("--hard-negatives", type=float, default=0.5,
                   help="share of each batch that comes in pairs differing in one attribute (default 0.5)")
    p.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto trains under bfloat16 autocast where the CPU runs it natively (default auto)")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out pictures to evaluate on (default 1000)")
    for name in MODEL_SHAPE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"model {name} (default {MODEL_SHAPE[name]})")


def run(args) -> Dict[str, float]:
    from flows.settings import DEMO_MODEL_DIR

    shape = {name: getattr(args, name) for name in MODEL_SHAPE if getattr(args, name) is not None}
    return train(args.out or DEMO_MODEL_DIR, minutes=args.minutes, seed=args.seed, pool_size=args.pool,
                 batch_size=args.batch_size, max_steps=args.steps, hard_negatives=args.hard_negatives,
                 eval_size=args.eval_size, model_shape=shape, precision=args.precision)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m clipseek.demo.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
