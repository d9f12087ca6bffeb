"""Paired statistics: is one model better than another on the same units, beyond the noise?

Torch-free (numpy and scipy.stats only), so reports can be recomputed from JSON anywhere. A unit
is one paired observation, e.g. the same few-shot draw r and the same pretraining seed for two
strategies, or the same GUE task for two models. Everything random is drawn from a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
NO_DIFFERENCE = "no difference shown"
TOO_FEW = "too few pairs (n < 2): no interval or test"


@dataclass(frozen=True)
class Paired:
    """a - b over n paired units: the mean difference, a 95 % percentile bootstrap interval of
    it, the two-sided paired t-test p-value, and a verdict read from the interval."""

    n: int
    mean_diff: float | None
    ci95: tuple[float, float] | None
    p: float | None
    verdict: str
    resamples: int = BOOTSTRAP_RESAMPLES

    def as_dict(self) -> dict:
        return {"mean_diff": self.mean_diff,
                "ci95": list(self.ci95) if self.ci95 is not None else None,
                "p": self.p, "n": self.n, "verdict": self.verdict,
                "bootstrap_resamples": self.resamples}


def paired(a, b, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
           names: tuple[str, str] = ("a", "b")) -> Paired:
    """Paired comparison of a and b (equal-length sequences; unit i of a pairs with unit i of b).

    The interval resamples the n differences with replacement `resamples` times (numpy
    default_rng(seed)) and takes the 2.5th and 97.5th percentiles of the resampled means. The
    verdict is NO_DIFFERENCE when the interval covers 0, else "<a> > <b>" or "<a> < <b>". With
    n < 2 there is no interval and no test: mean_diff is given (n = 1) or None (n = 0), ci95 and
    p are None, and the verdict says why."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired: a and b must be 1-D of one length, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"paired: resamples must be >= 1, got {resamples}")
    d = a - b
    n = int(d.size)
    if n < 2:
        return Paired(n, float(d[0]) if n else None, None, None, TOO_FEW, resamples)
    mean = float(d.mean())
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    if np.ptp(d) <= 1e-12 * max(1.0, abs(mean)):
        # No spread (up to rounding: 0.65 - 0.6 and 0.75 - 0.7 differ in the last bit): the t
        # statistic is undefined; a constant nonzero difference is as certain as data can be, a
        # zero one is no difference at all.
        p = 1.0 if abs(mean) <= 1e-12 else 0.0
    else:
        p = float(_scipy_stats.ttest_rel(a, b).pvalue)
    if lo <= 0.0 <= hi:
        verdict = NO_DIFFERENCE
    else:
        verdict = f"{names[0]} > {names[1]}" if mean > 0 else f"{names[0]} < {names[1]}"
    return Paired(n, mean, (lo, hi), p, verdict, resamples)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"
