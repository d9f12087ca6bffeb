"""PMI and NPMI of every k-mer from n-gram counts (GeneMask eq. 1, PMI-Masking's definition).

PMI_k(w) = min over segmentations of w into >= 2 contiguous parts of log p(w) - sum log p(part),
with p_n(u) = f(u) / (number of n-grams counted). The best segmentation is a dynamic programme
over split points, run for all 4^k k-mers at once: O(k^2) array operations in all.
NPMI_k(w) = PMI_k(w) * log f(w) / (log c + log f(w)); k-mers seen fewer than c times get NaN.
"""
from __future__ import annotations

import numpy as np


def log_probs(counts: list[np.ndarray], k: int) -> list[np.ndarray]:
    """log p_n for n = 1..k (index n; -inf for unseen n-grams)."""
    out = [np.zeros(1)]
    for n in range(1, k + 1):
        total = counts[n].sum()
        with np.errstate(divide="ignore"):
            out.append(np.log(counts[n] / total) if total else np.full(4 ** n, -np.inf))
    return out


def pmi(counts: list[np.ndarray], k: int) -> np.ndarray:
    """PMI_k of every k-mer code (float64 [4^k]); NaN where the k-mer or a part was never seen."""
    lp = log_probs(counts, k)
    code = np.arange(4 ** k, dtype=np.int64)

    def part(i: int, j: int) -> np.ndarray:   # log p of bases i..j-1 of every k-mer
        return lp[j - i][(code >> (2 * (k - j))) & ((1 << (2 * (j - i))) - 1)]

    # best[j]: highest sum of log p over segmentations of the first j bases into >= 1 parts
    best = [None] + [part(0, j) for j in range(1, k)]
    for j in range(2, k):
        for i in range(1, j):
            best[j] = np.maximum(best[j], best[i] + part(i, j))
    seg = np.max([best[j] + part(j, k) for j in range(1, k)], axis=0)   # last part w[j:k]
    with np.errstate(invalid="ignore"):
        out = lp[k] - seg
    out[~np.isfinite(out)] = np.nan
    return out


DEFINITIONS = ("genemask", "levine")


def npmi(counts: list[np.ndarray], k: int, min_count: int, definition: str = "genemask"
         ) -> tuple[np.ndarray, np.ndarray]:
    """(pmi, npmi) per k-mer code; npmi is NaN for k-mers counted fewer than min_count times.

    PLACEHOLDER for the plumbing: both definitions compute the levine one here; the genemask
    definition is preprocessing/npmi.py's of the NPMI-definition work, which replaces this file.
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    p = pmi(counts, k)
    f = counts[k].astype(np.float64)
    scored = (f >= min_count) & ~np.isnan(p)
    out = np.full(4 ** k, np.nan)
    logf = np.log(f[scored])
    denom = np.log(min_count) + logf
    # c = f = 1 makes the factor 0/0; PMI * log f is 0 there, so is the NPMI.
    out[scored] = np.divide(p[scored] * logf, denom, out=np.zeros_like(logf), where=denom > 0)
    return p, out
