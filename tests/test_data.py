"""The loader on real shards: batches equal a per-sample reading of the same samples whatever the
number of workers, resume positions, other on-disk layouts (float32 NPMI, chunked datasets),
corrupt token ids, and the shared-memory slots' guard."""
from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmgems.data import loader as data
from cmgems.data.loader import (SampleDataset, ShardedSampler, TrainBatches, collate, eval_loader)
from cmgems.data.shards import ShardError, ShardSet
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID

MAX_LENGTH, BS = 100, 5


def expected(dataset: SampleDataset, order) -> dict[str, torch.Tensor]:
    """The batch by the plain route: sample by sample through ShardSet[i], then collate."""
    return collate([dataset[int(i)] for i in order])


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].nan_to_num(-9.0), b[k].nan_to_num(-9.0)) for k in a)


def rewrite(src: Path, dst: Path, **create) -> None:
    """A copy of shard src with its datasets written with h5py options `create`
    (dtype_npmi: NPMI dtype; chunks=...)."""
    npmi_dtype = create.pop("dtype_npmi", None)
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for name in ("tokens", "npmi", "offsets"):
            values = f[name][:]
            if name == "npmi" and npmi_dtype is not None:
                values = values.astype(npmi_dtype)
            g.create_dataset(name, data=values, **(create if name != "offsets" else {}))
        for k, v in f.attrs.items():
            g.attrs[k] = v


@pytest.fixture(scope="module")
def train_set(tiny_dataset) -> SampleDataset:
    shards = ShardSet(tiny_dataset, "train")
    assert len(shards.readers) >= 2   # batches that span shards
    return SampleDataset(shards, MAX_LENGTH)


def test_batch_layout_and_lengths(train_set):
    b = train_set.batch([3, 0, len(train_set) - 1])
    assert b["input_ids"].dtype == b["attention_mask"].dtype == b["lengths"].dtype == torch.int64
    assert b["npmi"].dtype == torch.float32
    assert torch.equal(b["lengths"], b["attention_mask"].sum(1))
    for row, i in enumerate([3, 0, len(train_set) - 1]):
        tokens, npmi = train_set[i]
        n = len(tokens)
        assert b["lengths"][row] == n + 2 and n <= MAX_LENGTH - 2
        ids = b["input_ids"][row]
        assert ids[0] == CLS_ID and ids[n + 1] == SEP_ID and (ids[n + 2:] == PAD_ID).all()
        assert torch.equal(ids[1:n + 1], torch.from_numpy(tokens.astype(np.int64)))
        assert torch.isnan(b["npmi"][row, [0, n + 1]]).all()
        assert torch.isnan(b["npmi"][row, n + 2:]).all()
    assert same(b, expected(train_set, [3, 0, len(train_set) - 1]))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_stream_is_the_sampler_order_whatever_the_workers(train_set, workers):
    """Three epochs and a bit: the batches are the sampler's samples in its order, for 0, 1 and
    2 workers alike, and a stream started at position p is the tail of one started at 0."""
    tb = TrainBatches(train_set, BS, rank=0, world_size=1, seed=3, num_workers=workers)
    n = 3 * tb.per_epoch + 2
    got = list(itertools.islice(tb.from_position(0), n))
    sampler = ShardedSampler(len(train_set), 0, 1, seed=3)
    for b, batch in enumerate(got):
        epoch, j = divmod(b, tb.per_epoch)
        sampler.set_position(epoch)
        assert same(batch, expected(train_set, sampler.indices()[j * BS:(j + 1) * BS])), b
    start = tb.per_epoch - 1   # the last batch of epoch 0, then on into epoch 1
    resumed = list(itertools.islice(tb.from_position(start), 4))
    assert all(same(a, b) for a, b in zip(resumed, got[start:start + 4]))


def test_ranks_read_disjoint_samples(train_set):
    """Each rank's stream is its own share of the sampler's order; the shares do not overlap."""
    shares = []
    for rank in range(2):
        tb = TrainBatches(train_set, BS, rank=rank, world_size=2, seed=1, num_workers=1)
        mine = ShardedSampler(len(train_set), rank, 2, seed=1).indices()
        for j, batch in enumerate(itertools.islice(tb.from_position(0), tb.per_epoch)):
            assert same(batch, expected(train_set, mine[j * BS:(j + 1) * BS])), (rank, j)
        shares.append(set(mine[:tb.per_epoch * BS].tolist()))
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) > 0


def test_eval_batches_keep_their_order_and_repeat(tiny_dataset):
    valid = SampleDataset(ShardSet(tiny_dataset, "valid"), MAX_LENGTH)
    for workers in (0, 2):
        loader = eval_loader(valid, 3, rank=1, world_size=2, num_workers=workers)
        idx = np.arange(len(valid) - len(valid) % 2)[1::2]
        batches = list(loader)
        assert len(batches) == len(loader) == -(-len(idx) // 3)
        for j, b in enumerate(batches):
            assert same(b, expected(valid, idx[j * 3:(j + 1) * 3]))
        assert all(same(a, b) for a, b in zip(batches, loader))   # iterable again


@pytest.mark.parametrize("layout", ["npmi float32", "chunked"])
def test_other_on_disk_layouts_read_the_same(tiny_dataset, tmp_path, train_set, layout):
    """NPMI is read in the file's dtype (float32 here); chunked datasets have no single file
    offset and are read through h5py: the batches are the same either way."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)
    for path in sorted(copy.glob("train-*.h5")):
        path.rename(path.with_suffix(".orig"))
        opts = {"dtype_npmi": np.float32} if layout == "npmi float32" else {"chunks": (1000,)}
        rewrite(path.with_suffix(".orig"), path, **opts)
    shards = ShardSet(copy, "train")
    reader = shards.readers[0]
    if layout == "npmi float32":
        assert shards.npmi_dtype == np.float32 and reader.mapped
    else:
        assert not reader.mapped
    other = SampleDataset(shards, MAX_LENGTH)
    for workers in (0, 2):
        a = TrainBatches(train_set, BS, 0, 1, seed=0, num_workers=0).from_position(0)
        b = TrainBatches(other, BS, 0, 1, seed=0, num_workers=workers).from_position(0)
        for _ in range(12):
            x, y = next(a), next(b)
            if layout == "npmi float32":   # the same values, unrounded to float16 on disk
                assert torch.equal(x["input_ids"], y["input_ids"])
                assert torch.allclose(x["npmi"], y["npmi"], atol=1e-3, equal_nan=True)
            else:
                assert same(x, y)


def _corrupt_sample(tiny_dataset: Path, tmp_path: Path, sample: int) -> Path:
    """A copy of the dataset whose first train shard has an id outside the vocabulary in
    `sample` (in place, as a byte flip would leave it); returns the shard."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)
    victim = copy / "train-00000.h5"
    with h5py.File(victim, "r+") as f:
        lo = int(f["offsets"][sample])
        f["tokens"][lo + 2] = 60000
    return victim


@pytest.mark.parametrize("workers", [0, 2])
def test_an_id_outside_the_vocabulary_names_the_shard_and_sample(tiny_dataset, tmp_path,
                                                                  workers):
    victim = _corrupt_sample(tiny_dataset, tmp_path, sample=7)
    dataset = SampleDataset(ShardSet(victim.parent, "train"), MAX_LENGTH)
    sampler = ShardedSampler(len(dataset), 0, 1, seed=0)
    tb = TrainBatches(dataset, BS, 0, 1, seed=0, num_workers=workers)
    where = int(np.flatnonzero(sampler.indices() == 7)[0]) // BS   # the batch holding sample 7
    stream = tb.from_position(0)
    for _ in range(where):   # the batches before it are served
        next(stream)
    with pytest.raises(ShardError) as err:
        next(stream)
    message = str(err.value)
    assert message.startswith(f"{victim}: sample 7 holds token id 60000 outside the vocabulary")
    assert "\n" not in message and "Traceback" not in message and err.value.path == victim
    with pytest.raises(ShardError, match="sample 7 holds token id 60000"):
        dataset[7]


def test_a_reused_slot_is_an_error_not_a_wrong_batch(train_set):
    slots = data._Slots(3, BS, MAX_LENGTH, train_set.shards.token_dtype,
                        train_set.shards.npmi_dtype)
    held = slots.write(4, train_set.shards, np.arange(BS), train_set.max_tokens)
    assert same(slots.read(held, pin_memory=False), expected(train_set, range(BS)))
    slots.write(7, train_set.shards, np.arange(BS, 2 * BS), train_set.max_tokens)   # 7 % 3 == 4 % 3
    with pytest.raises(RuntimeError, match="slot 1 was rewritten before batch 4"):
        slots.read(held, pin_memory=False)
