"""PMI and NPMI of every k-mer from n-gram counts, under either of two definitions.

Both take PMI_k(w) = min over segmentations S of w of log p(w) - sum over parts u of S of log p(u),
f(u) being u's count; they differ in the segmentations allowed and in the probabilities:
- `genemask` (the definition of GeneMask's published GRCh38 table): parts of length 1 and 2 only,
  and every n-gram probability p(u) = f(u) / T with one common total T = the number of 1-grams
  plus the number of 2-grams counted: 2N - S on a genome of N A/C/G/T bases in S unbroken
  stretches, i.e. about twice its A/C/G/T bases, or twice its k-mers.
- `levine` (PMI-Masking, Levine et al. 2021): every segmentation into >= 2 contiguous parts,
  and p(u) = f(u) / (number of n-grams counted), n = len(u): one total per length.
The best segmentation is a dynamic programme over the end of its last part, run for all 4^k
k-mers at once: one array operation per (end, part length) pair.
NPMI_k(w) = PMI_k(w) * log f(w) / (log c + log f(w)) for both; k-mers seen fewer than c times,
and k-mers never seen, get NaN.
"""
from __future__ import annotations

import numpy as np

DEFINITIONS = ("genemask", "levine")


def _check(k: int, definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown NPMI definition {definition!r}; choose from {DEFINITIONS}")
    if k < 2:
        raise ValueError(f"PMI needs k >= 2 (a k-mer split into >= 2 parts), got {k}")


def part_lengths(k: int, definition: str) -> tuple[int, ...]:
    """Lengths a part of a k-mer's segmentation may have: all shorter than k, so >= 2 parts."""
    _check(k, definition)
    return tuple(range(1, min(k, 3) if definition == "genemask" else k))


def log_probs(counts: list[np.ndarray], k: int, definition: str = "genemask"
              ) -> list[np.ndarray]:
    """log p_n for n = 1..k (index n), -inf for unseen n-grams; all -inf if nothing was counted."""
    _check(k, definition)
    # GeneMask's table divides every count by one total, that of the parts' lengths pooled
    common = counts[1].sum() + counts[2].sum()
    out = [np.zeros(1)]
    for n in range(1, k + 1):
        total = common if definition == "genemask" else counts[n].sum()
        with np.errstate(divide="ignore"):
            out.append(np.log(counts[n] / total) if total else np.full(4 ** n, -np.inf))
    return out


def pmi(counts: list[np.ndarray], k: int, definition: str = "genemask") -> np.ndarray:
    """PMI_k of every k-mer code (float64 [4^k]); NaN where the k-mer went unseen (or, with
    counts from no one genome, every segmentation has an unseen part)."""
    lp = log_probs(counts, k, definition)
    code = np.arange(4 ** k, dtype=np.int64)

    def part(i: int, j: int) -> np.ndarray:   # log p of bases i..j-1 of every k-mer
        return lp[j - i][(code >> (2 * (k - j))) & ((1 << (2 * (j - i))) - 1)]

    # best[j]: highest sum of log p over segmentations of the first j bases
    best = [np.zeros(4 ** k)]
    lengths = part_lengths(k, definition)
    for j in range(1, k + 1):
        best.append(np.max([best[j - n] + part(j - n, j) for n in lengths if n <= j], axis=0))
    with np.errstate(invalid="ignore"):
        out = lp[k] - best[k]
    out[~np.isfinite(out)] = np.nan
    return out


def npmi(counts: list[np.ndarray], k: int, min_count: int, definition: str = "genemask"
         ) -> tuple[np.ndarray, np.ndarray]:
    """(pmi, npmi) per k-mer code; npmi is NaN for k-mers counted fewer than min_count times."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    p = pmi(counts, k, definition)
    f = counts[k].astype(np.float64)
    scored = (f >= min_count) & ~np.isnan(p)
    out = np.full(4 ** k, np.nan)
    logf = np.log(f[scored])
    denom = np.log(min_count) + logf
    # c = f = 1 makes the factor 0/0; PMI * log f is 0 there, so is the NPMI.
    out[scored] = np.divide(p[scored] * logf, denom, out=np.zeros_like(logf), where=denom > 0)
    return p, out
