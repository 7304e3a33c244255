"""Paired bootstrap intervals on constructed cases with known answers."""

import numpy as np
import pytest

from prag_vllm.evaluation.bootstrap import paired_bootstrap, paired_scores


def test_constant_difference_has_a_zero_width_interval():
    a = np.linspace(0, 1, 50)
    r = paired_bootstrap(a + 0.25, a)
    assert r.diff == pytest.approx(0.25) and r.ci_low == pytest.approx(0.25) and r.ci_high == pytest.approx(0.25)
    assert r.distinguishable and r.n == 50


def test_interval_matches_the_normal_approximation():
    """d_i = 1 for half the questions, 0 otherwise: mean 0.5, standard error sqrt(0.25 / n)."""
    n = 400
    d = np.array([1.0, 0.0] * (n // 2))
    r = paired_bootstrap(d, np.zeros(n), resamples=20_000)
    half = 1.96 * np.sqrt(0.25 / n)
    assert r.diff == pytest.approx(0.5)
    assert r.ci_low == pytest.approx(0.5 - half, abs=0.01) and r.ci_high == pytest.approx(0.5 + half, abs=0.01)


def test_pairing_matters():
    """Two modes with large per-question spread but an identical +0.1 gain on every question:
    the paired interval is tight; an unpaired one would straddle zero."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, 60)
    r = paired_bootstrap(base + 0.1, base)
    assert r.ci_low > 0.09 and r.distinguishable


def test_no_difference_is_not_distinguishable():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    r = paired_bootstrap(a, a.copy())
    assert not r.distinguishable or (r.ci_low == r.ci_high == 0)
    r2 = paired_bootstrap(a, b)
    assert r2.ci_low < r2.diff < r2.ci_high


def test_deterministic_and_validated():
    a, b = [0.1, 0.5, 0.9], [0.0, 0.5, 1.0]
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])
    assert paired_bootstrap([], []).n == 0


def test_paired_scores_align_by_question():
    rows = [{"id": "q1", "mode": "parametric", "f1": 1.0}, {"id": "q2", "mode": "parametric", "f1": 0.0},
            {"id": "q2", "mode": "closed-book", "f1": 0.5}, {"id": "q1", "mode": "closed-book", "f1": 0.25},
            {"id": "q3", "mode": "closed-book", "f1": 0.0}]
    a, b = paired_scores(rows, ("parametric", None), ("closed-book", None))
    assert a == [1.0, 0.0] and b == [0.25, 0.5]
