"""Cutting one piece of sequence into training samples (DNABERT's length rule), vectorized.

Sample lengths follow DNABERT: half of them MAX_TOKENS, the rest uniform in MIN_TOKENS..MAX_TOKENS.
Lengths are drawn as one stream over the piece's valid tokens; every break in the ACGT run (a
non-ACGT symbol) is an extra cut, so no sample spans one, and fragments shorter than MIN_TOKENS
are dropped. The generator is seeded by (seed, record, piece): the result does not depend on how
many workers share the pieces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmgems.data.tokens import NUM_SPECIAL

from .kmers import encode, non_acgt, windows

MAX_TOKENS = 510          # 512 positions with [CLS] and [SEP]
MIN_TOKENS = 5
FULL_FRACTION = 0.5       # share of samples drawn at MAX_TOKENS
_MEAN = FULL_FRACTION * MAX_TOKENS + (1 - FULL_FRACTION) * (MIN_TOKENS + MAX_TOKENS) / 2


@dataclass
class PieceSamples:
    tokens: np.ndarray    # uint16 token ids of all kept samples back to back
    npmi: np.ndarray      # NPMI per token, as shards store it (cmgems.data.shards.NPMI_DTYPE)
    lengths: np.ndarray   # int64 tokens per sample
    valid: np.ndarray     # bool per sample: goes to the validation split
    dropped: int          # tokens in fragments shorter than MIN_TOKENS
    non_acgt: int         # non-ACGT symbols in the piece (its overlap excluded)


@dataclass
class Layout:
    """Where a piece's samples lie: what cut_piece decides before it gathers any token (so
    the shards' plan is known from a counting pass, before the tokens are cut)."""
    lengths: np.ndarray   # int64 tokens per sample
    valid: np.ndarray     # bool per sample: goes to the validation split
    dropped: int          # tokens in fragments shorter than MIN_TOKENS
    seg: np.ndarray       # lengths of all segments between cuts, kept ones and dropped ones
    keep: np.ndarray      # bool per segment: long enough to be a sample
    first: int            # position of the first token of the piece
    ntok: int             # tokens (complete k-mers) in the piece
    contiguous: bool      # the tokens form one run from `first`


def draw_lengths(rng: np.random.Generator, total: int) -> np.ndarray:
    """Sample lengths whose sum reaches at least `total` tokens."""
    out, have = [], 0
    while have < total:
        m = int((total - have) / _MEAN * 1.1) + 8
        full = rng.random(m) < FULL_FRACTION
        lens = np.where(full, MAX_TOKENS, rng.integers(MIN_TOKENS, MAX_TOKENS + 1, m))
        out.append(lens)
        have += int(lens.sum())
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def layout(vlen: np.ndarray, k: int, rng: np.random.Generator, valid_fraction: float,
           all_valid: bool) -> Layout:
    """The samples of a piece from windows()' stretch lengths, drawing from `rng` (seeded by
    (seed, record, piece)): the same draws whoever calls it, so pass 1 and pass 2 agree."""
    ok = vlen == k                            # a complete k-mer (a token) starts here
    ntok = int(np.count_nonzero(ok))
    first = int(ok.argmax()) if ntok else 0
    # fast path: one ACGT run through the whole piece, the common case in assembled genomes
    contiguous = ntok > 0 and bool(ok[first:first + ntok].all())
    if contiguous:
        run_cuts = np.empty(0, np.int64)
    else:
        pos = np.flatnonzero(ok)
        run_cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    stream_cuts = np.cumsum(draw_lengths(rng, ntok))
    cuts = np.unique(np.concatenate(([0], stream_cuts[stream_cuts < ntok], run_cuts, [ntok])))
    seg = np.diff(cuts)
    keep = seg >= MIN_TOKENS
    lengths = seg[keep].astype(np.int64)
    if all_valid:
        valid = np.ones(len(lengths), dtype=bool)
    else:
        valid = rng.random(len(lengths)) < valid_fraction
    return Layout(lengths=lengths, valid=valid, dropped=int(seg[~keep].sum()), seg=seg,
                  keep=keep, first=first, ntok=ntok, contiguous=contiguous)


def kept_codes(code: np.ndarray, vlen: np.ndarray, lay: Layout, k: int) -> np.ndarray:
    """k-mer codes of the layout's samples, back to back."""
    first, ntok = lay.first, lay.ntok
    if lay.contiguous and lay.keep.all():
        return code[first:first + ntok]
    if lay.contiguous:
        return code[first:first + ntok][np.repeat(lay.keep, lay.seg)]
    return code[np.flatnonzero(vlen == k)[np.repeat(lay.keep, lay.seg)]]


def cut_piece(seq: bytes, overlap: int, k: int, table: np.ndarray, rng: np.random.Generator,
              valid_fraction: float, all_valid: bool) -> PieceSamples:
    codes = encode(seq)
    code, vlen = windows(codes, k)
    lay = layout(vlen, k, rng, valid_fraction, all_valid)
    kcode = kept_codes(code, vlen, lay, k)
    return PieceSamples(tokens=kcode + np.uint16(NUM_SPECIAL), npmi=table[kcode],
                        lengths=lay.lengths, valid=lay.valid, dropped=lay.dropped,
                        non_acgt=non_acgt(codes, overlap))
