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
