"""The demo trainer's batches: hard negatives that differ from a picture in exactly one attribute."""

import itertools

import numpy as np

from clipseek.demo.train import ATTRS, VALUES, hard_negative_batch


def _pool(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(len(VALUES[a]), size=n) for a in ATTRS], axis=1)


def _index(codes):
    by_key = {}
    for i, c in enumerate(codes):
        by_key.setdefault(tuple(int(v) for v in c[:5]), []).append(i)
    return {k: np.array(v) for k, v in by_key.items()}


def _one_apart(codes, batch) -> int:
    return sum(1 for i, j in itertools.combinations(batch, 2) if int((codes[i][:5] != codes[j][:5]).sum()) == 1)


def test_batches_hold_pairs_one_attribute_apart():
    codes = _pool(20000)
    by_key = _index(codes)
    rng = np.random.default_rng(1)
    hard = hard_negative_batch(codes, by_key, 128, rng, share=0.5)
    plain = np.random.default_rng(1).choice(len(codes), 128, replace=False)
    assert len(hard) == 128 and len(set(hard.tolist())) == 128
    # a random batch holds such pairs by chance; the hard batch holds about one more per variant added (32 here)
    assert _one_apart(codes, hard) >= _one_apart(codes, plain) + 20, (_one_apart(codes, hard), _one_apart(codes, plain))


def test_a_pool_without_variants_still_fills_the_batch():
    codes = _pool(40, seed=3)
    batch = hard_negative_batch(codes, _index(codes), 32, np.random.default_rng(0), share=0.5)
    assert len(batch) == 32 and len(set(batch.tolist())) == 32 and batch.max() < 40


def test_a_caption_says_a_only_for_a_single_shape():
    """"a red circle" means one red circle, as a user means it: "a" is never the article of two or three."""
    import random

    from clipseek.demo.train import caption_for

    rng = random.Random(0)
    count = ATTRS.index("count")
    singles = 0
    for codes in _pool(3000, seed=5):
        text, mask = caption_for(codes, rng)
        body = text.split(" of ", 1)[-1]  # after "a photo of ", "an image of ", ...
        n = VALUES["count"][codes[count]]
        if body.startswith("a "):
            assert n == 1 and mask[count], (text, n, mask)
            singles += 1
        elif mask[count]:
            assert body.split()[0] == {2: "two", 3: "three"}[n], text
    assert singles > 300


def test_training_precision_is_checked():
    import pytest

    from clipseek.demo.train import training_autocast

    assert training_autocast("float32") is False and training_autocast("bfloat16") is True
    with pytest.raises(ValueError, match="float16"):
        training_autocast("float16")
