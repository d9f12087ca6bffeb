"""Vectorized k-mer work on one piece of sequence: 2-bit codes, rolling codes, n-gram counts.

Same codes as cmgems.data.tokens (A=0 T=1 C=2 G=3, first base most significant), but built for
throughput: bytes.translate instead of a fancy-index lookup, and uint16 rolling codes (4^6 fits)
instead of int64, which keeps every pass over the piece in cache-friendly narrow types.
"""
from __future__ import annotations

import numpy as np

from cmgems.data.tokens import ALPHABET

INVALID = 4   # code of any symbol that is not A/C/G/T (N, IUPAC, '-')
_TABLE = bytearray([INVALID]) * 256
for _i, _b in enumerate(ALPHABET):
    _TABLE[ord(_b)] = _TABLE[ord(_b.lower())] = _i
_TABLE = bytes(_TABLE)


def encode(seq: bytes) -> np.ndarray:
    """uint8 code per base; INVALID for anything but A/C/G/T (soft-masked lower case included)."""
    return np.frombuffer(seq.translate(_TABLE), dtype=np.uint8)


def windows(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every start position i: the code of the k bases from i (uint16) and how many of them,
    counted from i, are A/C/G/T before the first other symbol or the piece's end (uint8, 0..k).

    The prefix of length n <= vlen[i] of code[i] is the n-gram starting at i; code[i] is the
    token's k-mer code where vlen[i] == k.
    """
    n = len(codes)
    valid = np.zeros(n + k - 1, dtype=np.uint8)
    valid[:n] = codes < INVALID
    c = np.zeros(n + k - 1, dtype=np.uint16)
    c[:n] = codes & 3   # INVALID (4) becomes 0: any value works there, vlen excludes it
    code = c[:n].copy()
    vlen = valid[:n].copy()
    run = vlen.copy()
    for j in range(1, k):   # k-1 shifted passes, vectorized over every position
        code <<= 2
        code |= c[j:j + n]
        run &= valid[j:j + n]
        vlen += run
    return code, vlen


def count_table(seq: bytes, k: int, overlap: int) -> tuple[np.ndarray, int]:
    """int64 [k+1, 4^k]: entry (v, c) counts start positions whose ACGT stretch is v long (capped
    at k) and whose k-base code is c. Every n-gram (n <= v) starting there is the n-base prefix
    of c, so ngram_counts() recovers all n-gram counts, n = 1..k, from this one bincount.

    Also returns the number of non-ACGT symbols (overlap excluded).
    The first `overlap` bases repeat the previous piece's tail: n-grams wholly inside them were
    counted there, so each such start keeps only n-grams reaching past the overlap.
    """
    codes = encode(seq)
    code, vlen = windows(codes, k)
    return count_windows(code, vlen, k, overlap), non_acgt(codes, overlap)


def non_acgt(codes: np.ndarray, overlap: int) -> int:
    """Symbols other than A/C/G/T in a piece, its overlap excluded."""
    return int(np.count_nonzero(codes[overlap:] == INVALID))


def count_windows(code: np.ndarray, vlen: np.ndarray, k: int, overlap: int) -> np.ndarray:
    """count_table's table from windows() already computed (shared with cutting samples)."""
    size = 4 ** k
    key = vlen.astype(np.uint16)   # (k+1) * 4^k <= 7 * 4096 keys: 16 bits hold them all
    key <<= 2 * k
    key |= code
    table = np.bincount(key, minlength=(k + 1) * size)
    if overlap:
        p = np.arange(min(overlap, len(code)))
        seen = np.minimum(vlen[p], overlap - p).astype(np.int64)
        table -= np.bincount(seen * size + code[p], minlength=(k + 1) * size)
    return table.reshape(k + 1, size)


def ngram_counts(table: np.ndarray, k: int) -> list[np.ndarray]:
    """counts[n] (n = 1..k; counts[0] unused) as int64 arrays of 4^n from a count_table sum."""
    at_least = np.cumsum(table[::-1], axis=0)[::-1]   # at_least[n][c]: starts with vlen >= n
    counts = [np.zeros(1, dtype=np.int64)]
    for n in range(1, k + 1):
        counts.append(at_least[n].reshape(4 ** n, 4 ** (k - n)).sum(axis=1))
    return counts
