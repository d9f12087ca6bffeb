"""GeneMask's sample construction (`build --sampling genemask`), as its published data-creation
notebook cuts the genome, vectorized per record.

Per record: every N is removed and its flanks joined; the first piece starts at a random offset
below min(1000, length); each piece is 511 nucleotides with probability 1/2, else u + 1 with u
uniform in 5..509 (so 506 or 1..505 tokens of k = 6), back to back; the record's last
nucleotide is never used and its last piece is cut short there (the notebook stops at
length - 1). A piece shorter than k holds no token and is dropped. Other non-ACGT symbols stay
in place; a k-mer holding one is [UNK] (NaN NPMI), as DNABERT's tokenizer reads it. Across the
genome, duplicate pieces (the same bases) are kept once, the first in file order; the split is
one Bernoulli(valid_fraction) draw per kept piece. Every draw comes from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmgems.data.tokens import NUM_SPECIAL, UNK_ID

from .kmers import encode, windows

MAX_NT = 511          # a full piece: 510 + 1 nucleotides
SHORT_NT = (5, 510)   # a short piece: uniform u in [5, 510) nucleotides, plus one
START_BELOW = 1000    # the first piece starts at an offset below min(this, record length)
FULL_FRACTION = 0.5
_N = np.frombuffer(b"Nn", dtype=np.uint8)
_SPLIT_TAG = 0x6E5A   # keys the split draws apart from the per-record draws


def drop_n(seq: bytes) -> bytes:
    """The record with every N (either case) removed, its flanks joined."""
    arr = np.frombuffer(seq, dtype=np.uint8)
    return arr[~np.isin(arr, _N)].tobytes()


def piece_bounds(length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) in nucleotides of a record of `length` bases (N already removed)."""
    if length <= 1:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    offset = int(rng.integers(0, min(START_BELOW, length)))
    last = length - 1                                   # the notebook's end index
    sizes, have = [], offset
    while have < last:
        m = int((last - have) / 256) + 8
        full = rng.random(m) < FULL_FRACTION
        nt = np.where(full, MAX_NT, rng.integers(*SHORT_NT, m) + 1)
        sizes.append(nt)
        have += int(nt.sum())
    nt = np.concatenate(sizes)
    starts = offset + np.concatenate(([0], np.cumsum(nt)[:-1]))
    keep = starts < last
    starts = starts[keep]
    return starts, np.minimum(starts + nt[keep], last)


@dataclass
class RecordSamples:
    tokens: np.ndarray    # uint16 token ids of all samples back to back
    npmi: np.ndarray      # NPMI per token (NaN for [UNK])
    lengths: np.ndarray   # int64 tokens per sample
    pieces: list[bytes]   # each sample's bases, for removing duplicates
    removed_n: int        # N symbols removed


def cut_record(seq: bytes, k: int, table: np.ndarray, rng: np.random.Generator) -> RecordSamples:
    """The record's samples by GeneMask's rule (duplicates not yet removed)."""
    clean = drop_n(seq)
    starts, ends = piece_bounds(len(clean), rng)
    ntok = ends - starts - k + 1
    ok = ntok >= 1
    starts, ends, ntok = starts[ok], ends[ok], ntok[ok]
    code, vlen = windows(encode(clean), k)
    at = np.repeat(starts - np.concatenate(([0], np.cumsum(ntok)[:-1])), ntok) + \
        np.arange(int(ntok.sum()))
    full = vlen[at] == k
    kcode = code[at]
    tokens = np.where(full, kcode + NUM_SPECIAL, UNK_ID).astype(np.uint16)
    npmi = np.where(full, table[kcode], np.nan).astype(table.dtype)
    pieces = [clean[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    return RecordSamples(tokens, npmi, ntok.astype(np.int64), pieces, len(seq) - len(clean))


def record_rng(seed: int, record: int) -> np.random.Generator:
    return np.random.default_rng([seed, record])


def split_draws(seed: int, n: int, valid_fraction: float) -> np.ndarray:
    """Bool per kept sample: goes to validation (one Bernoulli draw each)."""
    return np.random.default_rng([seed, _SPLIT_TAG]).random(n) < valid_fraction
