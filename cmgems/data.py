"""From shards to padded batches of raw tokens + NPMI. No masking here: that runs in the training
process, so a curriculum switch takes effect at an exact step and no prefetched batch carries the
old strategy.

Data order is a pure function of (seed, epoch, rank, world size): a resumed run recomputes where it
was from the step count alone.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cmgems.shards import ShardSet
from cmgems.tokens import CLS_ID, PAD_ID, SEP_ID


class SampleDataset(Dataset):
    """Sample i of a split as (token ids, npmi), cut to fit a block with [CLS] and [SEP]."""

    def __init__(self, shards: ShardSet, max_length: int):
        self.shards = shards
        self.max_tokens = max_length - 2

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, npmi = self.shards[i]
        return tokens[: self.max_tokens], npmi[: self.max_tokens]


class ShardedSampler(Sampler[int]):
    """DistributedSampler semantics (seeded per-epoch shuffle, rank r takes every world-th index,
    equal counts on every rank) plus a start offset, so a resumed run continues mid-epoch."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.per_rank = n // world_size   # drop the tail: every rank steps the same number of times
        if self.per_rank == 0:
            raise ValueError(f"{n} samples cannot be split over {world_size} ranks")
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> np.ndarray:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        return order[: self.per_rank * self.world][self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def collate(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """[CLS] tokens [SEP] [PAD]..., padded to the longest sample of the batch. NPMI is NaN at
    specials and pad so no strategy ever ranks them."""
    width = max(len(t) for t, _ in samples) + 2
    ids = torch.full((len(samples), width), PAD_ID, dtype=torch.long)
    npmi = torch.full((len(samples), width), float("nan"), dtype=torch.float32)
    for row, (t, v) in enumerate(samples):
        n = len(t)
        ids[row, 0] = CLS_ID
        ids[row, 1:n + 1] = torch.from_numpy(t.astype(np.int64))
        ids[row, n + 1] = SEP_ID
        npmi[row, 1:n + 1] = torch.from_numpy(v.astype(np.float32))
    return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "npmi": npmi}


class TrainBatches:
    """Endless stream of training micro-batches for one rank, positioned by a micro-batch count."""

    def __init__(self, dataset: SampleDataset, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, num_workers: int):
        self.dataset, self.bs, self.num_workers = dataset, micro_batch_size, num_workers
        self.sampler = ShardedSampler(len(dataset), rank, world_size, seed)
        self.per_epoch = self.sampler.per_rank // micro_batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(dataset)} training samples over {world_size} ranks give no "
                             f"full micro-batch of {micro_batch_size}")

    def from_position(self, consumed_micro_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        epoch, within = divmod(consumed_micro_batches, self.per_epoch)
        while True:
            self.sampler.set_position(epoch, within * self.bs)
            loader = DataLoader(self.dataset, batch_size=self.bs, sampler=self.sampler,
                                collate_fn=collate, drop_last=True, num_workers=self.num_workers,
                                persistent_workers=False,
                                prefetch_factor=4 if self.num_workers else None)
            yield from loader
            epoch, within = epoch + 1, 0


def eval_loader(dataset: SampleDataset, batch_size: int, rank: int, world_size: int,
                num_workers: int) -> DataLoader:
    """Fixed order, rank-disjoint, the same number of batches on every rank (ZeRO-3 gathers
    parameters collectively in every forward). The loss is all-reduced as sums, so the perplexity
    is exact over the samples used: all but the last len % world_size."""
    usable = len(dataset) - len(dataset) % world_size
    if usable == 0:
        raise ValueError(f"{len(dataset)} validation samples cannot be split over {world_size} "
                         f"ranks")
    idx = np.arange(usable)[rank::world_size].tolist()
    return DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False,
                      collate_fn=collate, num_workers=num_workers)
