"""Loader throughput: samples/s and real tokens/s of TrainBatches, against the per-sample loader
it replaced, measured in the same run on the same dataset.

TrainBatches (cmgems.data.loader) builds each micro-batch whole: one memory-mapped gather per shard and a
numpy layout. The baseline, kept here verbatim in spirit, is the loader cmgems had before: an
h5py read per sample (tokens, then NPMI), a per-row torch collate, a DataLoader over sample
indices (a new one, with new workers, every epoch). Both read the bundled E. coli dataset (built
if missing), batch 64, blocks of 512, the same sample order; the consumer does nothing but take the
batch (or, with --device cuda, copy it to the GPU from pinned memory). Time to the first batch
(worker start-up) is left out and reported apart. Each figure is the median of --runs timed runs.

"packed" adds the CPU packing plan of every batch (cmgems.data.packing.plan, rows of --max-length) and
reports the share of real tokens in the positions attention covers (the rest of the model
computes the real tokens only).

    python benchmarks/bench_loader.py                     # 0, 1, 2 workers, 3 runs
    python benchmarks/bench_loader.py --device cuda       # pinned memory, copy to the GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks.common import add_data_dir, ensure_data, markdown_table  # noqa: E402
from cmgems.data import packing  # noqa: E402
from cmgems.data.loader import SampleDataset, ShardedSampler, TrainBatches  # noqa: E402
from cmgems.data.shards import ShardSet  # noqa: E402
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID  # noqa: E402

TARGET = 50_000  # samples/s with 2 workers on a 2-core machine


# ---------------------------------------------------------------------- the loader before
class PerSampleReader:
    """The reader before: an h5py handle opened lazily per process, two reads per sample."""

    def __init__(self, path: Path):
        self.path, self._file = path, None
        with h5py.File(path, "r") as f:
            self.offsets = f["offsets"][:]
            self.vocab_size = int(f.attrs["vocab_size"])

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        lo, hi = self.offsets[i], self.offsets[i + 1]
        tokens = self._file["tokens"][lo:hi]
        if hi > lo and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"{self.path}: sample {i} outside the vocabulary")
        return tokens, self._file["npmi"][lo:hi]

    def __getstate__(self):
        return {**self.__dict__, "_file": None}


class PerSampleDataset(Dataset):
    def __init__(self, shards: ShardSet, max_length: int):
        self.readers = [PerSampleReader(r.path) for r in shards.readers]
        self.cum = np.cumsum([0] + [len(r) for r in self.readers])
        self.max_tokens = max_length - 2

    def __len__(self):
        return int(self.cum[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.cum, i, side="right")) - 1
        tokens, npmi = self.readers[s][i - int(self.cum[s])]
        return tokens[: self.max_tokens], npmi[: self.max_tokens]


def per_sample_collate(samples):
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


def per_sample_stream(dataset: PerSampleDataset, bs: int, seed: int, workers: int, pin: bool):
    sampler = ShardedSampler(len(dataset), 0, 1, seed)
    epoch = 0
    while True:
        sampler.set_position(epoch, 0)
        yield from DataLoader(dataset, batch_size=bs, sampler=sampler,
                              collate_fn=per_sample_collate, drop_last=True,
                              num_workers=workers, persistent_workers=False, pin_memory=pin,
                              prefetch_factor=4 if workers else None)
        epoch += 1


# ---------------------------------------------------------------------- measuring
def time_stream(stream, batches: int, device: str, max_length: int, packed: bool
                ) -> dict[str, float]:
    """Start-up (to the first batch), then samples/s, real tokens/s and row-slot share over the
    next `batches` batches."""
    t0 = time.perf_counter()
    first = next(stream)
    startup = time.perf_counter() - t0
    samples = real = slots = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(stream)
        lengths = b["lengths"] if "lengths" in b else b["attention_mask"].sum(1)
        samples += len(lengths)
        real += int(lengths.sum())
        if packed:
            slots += packing.plan(lengths, b["input_ids"].shape[1], max_length).attention_slots
        else:
            slots += b["input_ids"].numel()
        if device != "cpu":
            for v in b.values():
                v.to(device, non_blocking=True)
    if device != "cpu":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del first
    return {"samples_per_s": samples / elapsed, "real_tokens_per_s": real / elapsed,
            "real_token_share": real / slots, "startup_s": startup}


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} if runs[0] else {}


def measure(args, shards: ShardSet) -> list[dict]:
    pin = args.device != "cpu"
    new_ds = SampleDataset(shards, args.max_length)
    old_ds = PerSampleDataset(shards, args.max_length)
    rows = []
    for workers in args.workers:
        before, after, packed = [], [], []
        for run in range(args.runs):
            seed = args.seed + run
            before.append(time_stream(per_sample_stream(old_ds, args.batch, seed, workers, pin),
                                      args.baseline_batches, args.device, args.max_length, False))
            tb = TrainBatches(new_ds, args.batch, 0, 1, seed, workers, pin_memory=pin)
            after.append(time_stream(tb.from_position(0), args.batches, args.device,
                                     args.max_length, False))
            packed.append(time_stream(tb.from_position(0), args.batches, args.device,
                                      args.max_length, True))
        for name, runs in (("per-sample (before)", before), ("TrainBatches", after),
                           ("TrainBatches + packing plan", packed)):
            rows.append({"loader": name, "workers": workers, **median_of(runs)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir(p)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batches", type=int, default=600, help="batches timed per run")
    p.add_argument("--baseline-batches", type=int, default=60,
                   help="batches timed per run of the (slow) per-sample baseline")
    p.add_argument("--runs", type=int, default=3, help="timed runs; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: pinned memory, copy to the GPU")
    p.add_argument("--json", type=Path, help="also write the rows here as JSON")
    args = p.parse_args()
    data_dir = Path(args.data_dir)
    ensure_data(data_dir)
    rows = measure(args, ShardSet(data_dir, "train"))
    base = {r["workers"]: r for r in rows if r["loader"].startswith("per-sample")}
    for r in rows:
        if r.get("samples_per_s") and not r["loader"].startswith("per-sample"):
            r["ratio"] = r["samples_per_s"] / base[r["workers"]]["samples_per_s"]
    print(f"loader, batch {args.batch} x {args.max_length}, {args.runs} runs (medians), "
          f"device {args.device}, dataset {data_dir}")
    print(markdown_table(rows, [("loader", "loader", "{}"), ("workers", "workers", "{}"),
                                ("samples_per_s", "samples/s", "{:,.0f}"),
                                ("real_tokens_per_s", "real tokens/s", "{:,.0f}"),
                                ("real_token_share", "real-token share", "{:.3f}"),
                                ("startup_s", "first batch s", "{:.3f}"),
                                ("ratio", "vs before", "{:.1f}x")]))
    best = max((r for r in rows if r["loader"] == "TrainBatches" and r["workers"] == 2),
               key=lambda r: r["samples_per_s"], default=None)
    if best is not None:
        ok = best["samples_per_s"] >= TARGET
        print(f"target: >= {TARGET:,} samples/s with 2 workers: "
              f"{best['samples_per_s']:,.0f} -> {'ok' if ok else 'BELOW TARGET'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
