"""Paired statistics against cases checkable by hand, and scipy's paired t-test."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from cmgems.evaluation.stats import NO_DIFFERENCE, TOO_FEW, paired


def test_constant_difference_is_certain_and_its_interval_is_a_point():
    b = np.array([0.5, 0.6, 0.7, 0.8])
    r = paired(b + 0.1, b, names=("x", "y"))
    assert r.n == 4 and r.mean_diff == pytest.approx(0.1)
    assert r.ci95 == pytest.approx((0.1, 0.1)) and r.p == 0.0 and r.verdict == "x > y"
    r = paired(b, b + 0.1, names=("x", "y"))
    assert r.verdict == "x < y" and r.mean_diff == pytest.approx(-0.1)
    same = paired(b, b)
    assert same.p == 1.0 and same.verdict == NO_DIFFERENCE and same.ci95 == (0.0, 0.0)


def test_p_value_is_scipys_paired_t_test_and_the_interval_holds_the_mean():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.7, 0.05, 12), rng.normal(0.65, 0.05, 12)
    r = paired(a, b)
    assert r.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert r.mean_diff == pytest.approx(np.mean(a - b))
    assert r.ci95[0] < r.mean_diff < r.ci95[1]
    # Hand check of the t statistic behind p: mean / (sd / sqrt(n)).
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    assert r.p == pytest.approx(2 * scipy_stats.t.sf(abs(t), d.size - 1))


def test_symmetric_noise_interval_covers_zero_and_is_reproducible():
    d = np.array([-0.3, 0.3, -0.2, 0.2, -0.1, 0.1, -0.25, 0.25])
    r = paired(d, np.zeros_like(d))
    assert r.mean_diff == pytest.approx(0.0, abs=1e-12)
    assert r.ci95[0] < 0 < r.ci95[1] and r.verdict == NO_DIFFERENCE
    assert r.p == pytest.approx(1.0)
    assert paired(d, np.zeros_like(d)) == r  # seeded: the same interval every time
    assert paired(d, np.zeros_like(d), seed=1).ci95 != r.ci95


def test_a_clear_shift_is_shown():
    rng = np.random.default_rng(0)
    b = rng.normal(0.5, 0.02, 20)
    a = b + 0.05 + rng.normal(0, 0.01, 20)
    r = paired(a, b, names=("cm_gems", "random"))
    assert r.ci95[0] > 0 and r.p < 1e-6 and r.verdict == "cm_gems > random"


def test_fewer_than_two_pairs_is_said_not_a_nan():
    one = paired([0.7], [0.6])
    assert one.n == 1 and one.mean_diff == pytest.approx(0.1)
    assert one.ci95 is None and one.p is None and one.verdict == TOO_FEW
    none = paired([], [])
    assert none.n == 0 and none.mean_diff is None and none.verdict == TOO_FEW
    assert one.as_dict()["ci95"] is None


def test_unequal_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired([1, 2], [1])
