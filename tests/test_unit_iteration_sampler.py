"""The iteration engine's per-row sampler: greedy, temperature, top_k and top_p as the search
options define them, and draws that depend only on the row's seed and logits."""

from __future__ import annotations

import numpy as np

from serving_service.iteration.sampler import Sampler

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))


def _draws(n: int = 4000, **options) -> np.ndarray:
    sampler = Sampler({"do_sample": True, "random_seed": 7, **options})
    return np.bincount([sampler(LOGITS) for _ in range(n)], minlength=len(LOGITS)) / n


def test_greedy_takes_the_argmax():
    assert Sampler({"do_sample": False})(LOGITS) == 1


def test_temperature_one_draws_the_softmax():
    freq = _draws(temperature=1.0, top_k=5, top_p=1.0)
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.03


def test_top_k_keeps_the_k_most_likely():
    freq = _draws(temperature=1.0, top_k=2)
    assert set(np.flatnonzero(freq)) == {1, 2}
    assert abs(freq[1] - 0.4 / 0.7) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    freq = _draws(temperature=1.0, top_k=0, top_p=0.75)  # 0.4 + 0.3 < 0.75: token 3 is needed too
    assert set(np.flatnonzero(freq)) == {1, 2, 3}
    assert set(np.flatnonzero(_draws(temperature=1.0, top_p=0.7))) == {1, 2}


def test_low_temperature_sharpens_and_high_flattens():
    assert _draws(temperature=0.05)[1] > 0.99
    assert _draws(temperature=50.0).min() > 0.15


def test_same_seed_same_tokens_whatever_else_was_drawn():
    a = Sampler({"do_sample": True, "random_seed": 11, "temperature": 1.0})
    b = Sampler({"do_sample": True, "random_seed": 11, "temperature": 1.0})
    other = Sampler({"do_sample": True, "random_seed": 11, "temperature": 1.0})
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=64) for _ in range(50)]
    first = [a(r) for r in rows]
    for r in rows:  # b's draws interleaved with another row's
        other(r[::-1])
    assert [b(r) for r in rows] == first
    c = Sampler({"do_sample": True, "random_seed": 12, "temperature": 1.0})
    assert [c(r) for r in rows] != first
