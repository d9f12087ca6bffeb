"""From shards to padded batches of raw tokens + NPMI. No masking here: that runs in the training
process, so a curriculum switch takes effect at an exact step and no prefetched batch carries the
old strategy.

Data order is a pure function of (seed, epoch, rank, world size): a resumed run recomputes where it
was from the step count alone. A loader worker builds whole batches (slices of memory-mapped
shards, laid out with numpy), so the order of batches is the same whatever the number of workers.
"""
from __future__ import annotations

import abc
import copy
import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cmgems.data.shards import ShardError, ShardSet
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID


def _frame(counts: np.ndarray, ids: np.ndarray, values: np.ndarray) -> int:
    """Rows [CLS] . . . [SEP] [PAD]... with NPMI NaN throughout (specials and pad are never
    ranked) in the first len(counts) rows of ids and values, for samples of `counts` tokens, to
    be filled from column 1; returns the width, the longest sample + 2."""
    rows = len(counts)
    width = int(counts.max()) + 2 if rows else 2
    ids[:rows, :width] = PAD_ID
    values[:rows, :width] = np.nan
    ids[:rows, 0] = CLS_ID
    ids[np.arange(rows), counts + 1] = SEP_ID
    return width


def read_batch(shards: ShardSet, indices, max_tokens: int, ids: np.ndarray,
               values: np.ndarray) -> tuple[np.ndarray, int]:
    """Samples `indices`, cut to max_tokens, as padded rows of ids and values (arrays of at
    least len(indices) rows and max_tokens + 2 columns); returns their counts and the width."""
    counts = shards.counts(indices, max_tokens)
    width = _frame(counts, ids, values)
    shards.read_rows(indices, counts, ids, values, at=1)
    return counts, width


def widen(ids: np.ndarray, values: np.ndarray, counts: np.ndarray, width: int,
          pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """The batch the training step takes, from rows laid out by read_batch (in any integer and
    float dtypes): input_ids and attention_mask int64 and npmi float32 [B, width], and
    `lengths` int64 [B], each row's real tokens with [CLS] and [SEP]. Always a copy (rows may
    be a loader slot that is reused); pin_memory: page-locked, for an asynchronous copy to the
    GPU."""
    rows = len(counts)
    lengths = torch.from_numpy(np.asarray(counts, dtype=np.int64) + 2)
    out = {"input_ids": torch.empty((rows, width), dtype=torch.int64, pin_memory=pin_memory),
           "attention_mask": torch.empty((rows, width), dtype=torch.int64, pin_memory=pin_memory),
           "npmi": torch.empty((rows, width), dtype=torch.float32, pin_memory=pin_memory),
           "lengths": torch.empty(rows, dtype=torch.int64, pin_memory=pin_memory)}
    out["input_ids"].copy_(torch.from_numpy(ids[:rows, :width]))
    out["npmi"].copy_(torch.from_numpy(values[:rows, :width]))
    torch.lt(torch.arange(width), lengths[:, None], out=out["attention_mask"])
    out["lengths"].copy_(lengths)
    return out


def collate(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The padded batch of samples given one by one as (tokens, npmi)."""
    counts = np.array([len(t) for t, _ in samples], dtype=np.int64)
    width = int(counts.max()) + 2 if len(counts) else 2
    ids = np.empty((len(counts), width), dtype=np.int64)
    values = np.empty((len(counts), width), dtype=np.float32)
    _frame(counts, ids, values)
    for row, (t, v) in enumerate(samples):
        ids[row, 1:len(t) + 1] = t
        values[row, 1:len(t) + 1] = v
    return widen(ids, values, counts, width)


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

    def batch(self, indices, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """The padded batch of samples `indices`, in that order (see widen)."""
        rows, cols = len(indices), self.max_tokens + 2
        ids = np.empty((rows, cols), dtype=self.shards.token_dtype)
        values = np.empty((rows, cols), dtype=self.shards.npmi_dtype)
        counts, width = read_batch(self.shards, indices, self.max_tokens, ids, values)
        return widen(ids, values, counts, width, pin_memory)


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

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's samples of `epoch` (default: the set position's), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        return order[: self.per_rank * self.world][self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


class _Failed:
    """A ShardError met in a worker, carried to the training process as a batch: re-raised there
    with its own message (a worker's exception would arrive wrapped in a traceback text)."""

    def __init__(self, error: ShardError):
        self.message, self.path = str(error), error.path


class _Slots:
    """Batch buffers in shared memory, written by loader workers in the compact dtypes of the
    shards and copied (widened) by the training process: a batch then crosses processes as a
    slot number, not as tensors (four shared-memory hand-overs a batch cost more than building
    it).

    Batch b goes to slot b % n. The DataLoader has at most prefetch_factor x num_workers batches
    in flight beyond the one it returns, so n = that + 2 slots are never written while read.
    Each slot carries the number of the batch it holds, set to -1 while a worker writes it and
    checked before and after the copy: a slot reused too early is an error, never a wrong batch.
    """

    def __init__(self, n: int, rows: int, max_length: int, token_dtype, npmi_dtype):
        self.shape = (n, rows, max_length)
        self.dtypes = (np.dtype(token_dtype), np.dtype(npmi_dtype))
        cells = n * rows * max_length
        self.sizes = (cells * self.dtypes[0].itemsize, cells * self.dtypes[1].itemsize,
                      n * rows * 8, n * 8)
        self.buffer = torch.zeros(sum(self.sizes), dtype=torch.uint8).share_memory_()
        self._views = None

    def views(self):
        """(ids, npmi, counts, batch number) as numpy views of the shared buffer."""
        if self._views is None:
            raw, at, views = self.buffer.numpy(), 0, []
            for size, (dtype, shape) in zip(self.sizes, (
                    (self.dtypes[0], self.shape), (self.dtypes[1], self.shape),
                    (np.int64, self.shape[:2]), (np.int64, self.shape[:1]))):
                views.append(raw[at:at + size].view(dtype).reshape(shape))
                at += size
            self._views = tuple(views)
        return self._views

    def __getstate__(self):
        return {**self.__dict__, "_views": None}

    def write(self, b: int, shards: ShardSet, indices: np.ndarray, max_tokens: int):
        ids, values, slot_counts, numbers = self.views()
        slot = b % self.shape[0]
        numbers[slot] = -1
        counts, width = read_batch(shards, indices, max_tokens, ids[slot], values[slot])
        slot_counts[slot, :len(counts)] = counts
        numbers[slot] = b
        return _InSlot(b, slot, len(counts), width)

    def read(self, held: "_InSlot", pin_memory: bool) -> dict[str, torch.Tensor]:
        ids, values, counts, numbers = self.views()
        s = held.slot
        if numbers[s] == held.batch:
            batch = widen(ids[s], values[s], counts[s, :held.rows], held.width, pin_memory)
            if numbers[s] == held.batch:
                return batch
        raise RuntimeError(f"loader slot {s} was rewritten before batch {held.batch} was read "
                           f"(holds batch {numbers[s]})")


class _InSlot:
    """Batch `batch` is in slot `slot` of the loader's _Slots: `rows` samples, `width` wide."""

    def __init__(self, batch: int, slot: int, rows: int, width: int):
        self.batch, self.slot, self.rows, self.width = batch, slot, rows, width


class _Batches(Dataset, abc.ABC):
    """Item b: batch b, built whole: in a loader worker into shared slots, in the training process
    directly. A subclass says which samples batch b holds."""

    slots: _Slots | None = None
    pin_memory = False

    @abc.abstractmethod
    def indices(self, b: int) -> np.ndarray:
        """The sample indices of batch b."""

    def __getitem__(self, b: int):
        try:
            if self.slots is not None:   # in a worker
                return self.slots.write(b, self.dataset.shards, self.indices(b),
                                        self.dataset.max_tokens)
            return self.dataset.batch(self.indices(b), self.pin_memory)
        except ShardError as e:
            return _Failed(e)


class _RunBatches(_Batches):
    """Item b: micro-batch b of the whole run on this rank (epoch b // per_epoch). Indexing by
    the run's micro-batch count lets one loader, and its workers, live across epochs."""

    def __init__(self, dataset: SampleDataset, sampler: ShardedSampler, micro_batch_size: int,
                 per_epoch: int):
        self.dataset, self.sampler, self.bs, self.per_epoch = (dataset, sampler, micro_batch_size,
                                                               per_epoch)
        self._epoch, self._order = None, None

    def indices(self, b: int) -> np.ndarray:
        epoch, j = divmod(b, self.per_epoch)
        if epoch != self._epoch:  # a permutation per epoch, computed once in each process
            self._epoch, self._order = epoch, self.sampler.indices(epoch)
        return self._order[j * self.bs:(j + 1) * self.bs]


class _FixedBatches(_Batches):
    """Batches of a fixed index list, in order (the last one may be short)."""

    def __init__(self, dataset: SampleDataset, indices: np.ndarray, batch_size: int):
        self.dataset, self.order, self.bs = dataset, indices, batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.bs)

    def indices(self, j: int) -> np.ndarray:
        return self.order[j * self.bs:(j + 1) * self.bs]


PREFETCH_FACTOR = 4  # batches in flight per worker


def _stream(batches: _Batches, numbers, num_workers: int, pin_memory: bool | None
            ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches `numbers` (an iterable of batch numbers) through a DataLoader, in that order."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    batches, slots = copy.copy(batches), None   # each stream its own slots
    if num_workers:
        shards = batches.dataset.shards
        slots = _Slots(PREFETCH_FACTOR * num_workers + 2, batches.bs,
                       batches.dataset.max_tokens + 2, shards.token_dtype, shards.npmi_dtype)
    batches.slots, batches.pin_memory = slots, pin   # before the workers start (they copy it)
    loader = DataLoader(batches, batch_size=None, sampler=numbers, num_workers=num_workers,
                        prefetch_factor=PREFETCH_FACTOR if num_workers else None)
    for item in loader:
        if isinstance(item, _Failed):
            raise ShardError(item.message, item.path)
        yield slots.read(item, pin) if isinstance(item, _InSlot) else item


class TrainBatches:
    """Endless stream of training micro-batches for one rank, positioned by a micro-batch count.
    pin_memory: page-locked batches for a fast, asynchronous copy to the GPU (default: when CUDA
    is available)."""

    def __init__(self, dataset: SampleDataset, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, num_workers: int, pin_memory: bool | None = None):
        self.dataset, self.bs, self.num_workers = dataset, micro_batch_size, num_workers
        self.pin_memory = pin_memory
        self.sampler = ShardedSampler(len(dataset), rank, world_size, seed)
        self.per_epoch = self.sampler.per_rank // micro_batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(dataset)} training samples over {world_size} ranks give no "
                             f"full micro-batch of {micro_batch_size}")

    def from_position(self, consumed_micro_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        batches = _RunBatches(self.dataset, self.sampler, self.bs, self.per_epoch)
        return _stream(batches, itertools.count(consumed_micro_batches), self.num_workers,
                       self.pin_memory)


class EvalBatches:
    """The validation batches of one rank (see eval_loader), iterable again and again."""

    def __init__(self, batches: _FixedBatches, num_workers: int, pin_memory: bool | None):
        self.batches, self.num_workers, self.pin_memory = batches, num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _stream(self.batches, range(len(self.batches)), self.num_workers, self.pin_memory)


def eval_loader(dataset: SampleDataset, batch_size: int, rank: int, world_size: int,
                num_workers: int, pin_memory: bool | None = None) -> EvalBatches:
    """Fixed order, rank-disjoint, the same number of batches on every rank (ZeRO-3 gathers
    parameters collectively in every forward). The loss is all-reduced as sums, so the perplexity
    is exact over the samples used: all but the last len % world_size."""
    usable = len(dataset) - len(dataset) % world_size
    if usable == 0:
        raise ValueError(f"{len(dataset)} validation samples cannot be split over {world_size} "
                         f"ranks")
    idx = np.arange(usable)[rank::world_size]
    return EvalBatches(_FixedBatches(dataset, idx, batch_size), num_workers, pin_memory)
