"""Where every sample of a build goes, known before any token is cut.

The sample layout of a piece (lengths and split of its samples, preprocessing.samples.layout)
does not depend on the NPMI, so the counting pass records it, piece by piece, in a ShardPlan:
for each split, the samples and tokens of each piece, and where `build`'s shards end (a shard
ends with the sample that reaches shard_tokens; the last one takes the rest). Then the cutting
pass knows, for every piece, which shards its samples fall into and at which sample and token
of each: a worker cuts the piece and writes its samples straight into those shards
(cmgems.data.shards.write_part), and a shard is hashed once the last piece writing into it is done.
Only per-piece and per-shard counts are kept: memory grows with the number of pieces and shards,
not with the number of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cmgems.data.layout import SPLITS
from cmgems.data.shards import ShardFile


@dataclass
class Part:
    """The samples of one piece that go into one shard: the piece's samples of the split
    number first..stop-1 become the shard's samples from number `sample_at`, from token
    `token_at`. Sent to a worker with the piece."""
    shard: ShardFile
    first: int
    stop: int
    token_at: int
    sample_at: int


@dataclass
class _Split:
    """The plan of one split: per piece and per shard counts, shard ends found as pieces come."""
    limit: int                     # shard_tokens: a shard ends with the sample reaching it
    piece_samples: list[int] = field(default_factory=list)
    piece_tokens: list[int] = field(default_factory=list)
    shard_samples: list[int] = field(default_factory=list)
    shard_tokens: list[int] = field(default_factory=list)
    open_samples: int = 0          # samples and tokens of the shard not yet ended
    open_tokens: int = 0

    def add(self, lengths: np.ndarray) -> None:
        self.piece_samples.append(len(lengths))
        self.piece_tokens.append(int(lengths.sum()))
        ends = np.cumsum(lengths, dtype=np.int64)
        at = 0                     # samples of this piece already in ended shards
        while True:
            reach = self.limit - self.open_tokens
            base = int(ends[at - 1]) if at else 0
            i = int(np.searchsorted(ends[at:], base + reach))   # first sample reaching it
            if at + i >= len(ends):
                break
            self.shard_samples.append(self.open_samples + i + 1)
            self.shard_tokens.append(self.open_tokens + int(ends[at + i]) - base)
            self.open_samples = self.open_tokens = 0
            at += i + 1
        self.open_samples += len(ends) - at
        self.open_tokens += int(ends[-1]) - (int(ends[at - 1]) if at else 0) if len(ends) else 0

    def close(self) -> None:
        if self.open_samples:
            self.shard_samples.append(self.open_samples)
            self.shard_tokens.append(self.open_tokens)
            self.open_samples = self.open_tokens = 0
        self.sample_start = np.concatenate(([0], np.cumsum(self.piece_samples, dtype=np.int64)))
        self.token_start = np.concatenate(([0], np.cumsum(self.piece_tokens, dtype=np.int64)))
        self.shard_start = np.concatenate(([0], np.cumsum(self.shard_samples, dtype=np.int64)))
        self.shard_token_start = np.concatenate(([0], np.cumsum(self.shard_tokens,
                                                                dtype=np.int64)))
        # the piece holding each shard's first and last sample
        starts = self.sample_start[1:]
        self.first_piece = np.searchsorted(starts, self.shard_start[:-1], "right")
        self.last_piece = np.searchsorted(starts, self.shard_start[1:] - 1, "right")


class ShardPlan:
    """Filled by `add` with every piece's layout in genome order, then closed; then `parts` says
    where a piece's samples go, `opening`/`completed` which shards to create and to hash."""

    def __init__(self, shard_tokens: int):
        self.splits = {s: _Split(shard_tokens) for s in SPLITS}
        self.pieces = 0

    def add(self, lengths: np.ndarray, valid: np.ndarray) -> None:
        for split, mask in (("train", ~valid), ("valid", valid)):
            self.splits[split].add(lengths[mask])
        self.pieces += 1

    def close(self) -> None:
        for sp in self.splits.values():
            sp.close()

    def shards(self, split: str) -> list[tuple[int, int]]:
        """(samples, tokens) of each shard of the split, in order."""
        sp = self.splits[split]
        return list(zip(sp.shard_samples, sp.shard_tokens))

    def expected(self, piece: int) -> dict[str, tuple[int, int]]:
        """{split: (samples, tokens)} that the piece must give."""
        return {s: (sp.piece_samples[piece], sp.piece_tokens[piece])
                for s, sp in self.splits.items()}

    def opening(self, split: str, piece: int) -> np.ndarray:
        """Shards of the split whose first sample is in this piece."""
        return np.flatnonzero(self.splits[split].first_piece == piece)

    def completed(self, split: str, piece: int) -> np.ndarray:
        """Shards of the split whose last sample is in this piece."""
        return np.flatnonzero(self.splits[split].last_piece == piece)

    def parts(self, split: str, piece: int, files: dict[int, ShardFile]) -> list[Part]:
        """Where the piece's samples of the split go (files: the split's created shards)."""
        sp = self.splits[split]
        a, b = int(sp.sample_start[piece]), int(sp.sample_start[piece + 1])
        if a == b:
            return []
        first = int(np.searchsorted(sp.shard_start, a, "right")) - 1
        last = int(np.searchsorted(sp.shard_start, b - 1, "right")) - 1
        out = []
        for sh in range(first, last + 1):
            lo, hi = max(a, int(sp.shard_start[sh])), min(b, int(sp.shard_start[sh + 1]))
            # the part begins at the piece's first sample, or at the shard's first (token 0)
            token_at = (int(sp.token_start[piece]) - int(sp.shard_token_start[sh])
                        if lo == a else 0)
            out.append(Part(files[sh], lo - a, hi - a, token_at, lo - int(sp.shard_start[sh])))
        return out
