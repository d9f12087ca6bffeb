"""Job-array preprocessing (count -> table -> shard -> finish over N groups) against one `build`.

A synthetic genome of equal records is built once with `build --workers 1` (the baseline, in the
same run) and once stage by stage, every task timed on its own, one after another, as a job
array's tasks would run side by side on N nodes. Printed per figure: the median of --repeats runs.
  critical path  max(count tasks) + table + max(shard tasks) + finish: the wall time on N nodes
  task-seconds   the sum of all tasks: what the array costs in CPU time (each task reads the
                 whole file, so this exceeds build's time)
The datasets are checked to be identical (same shard sha256s) on every run.

    python benchmarks/bench_preprocess_array.py [--groups 4] [--records 8] [--record-mbp 2]
"""
from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmgems.data.shards import Manifest  # noqa: E402
from preprocessing.array import count_stage, finish_stage, shard_stage, table_stage  # noqa: E402
from preprocessing.build import BuildConfig, build  # noqa: E402


def write_genome(path: Path, records: int, bases: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for r in range(records):
            seq = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, bases)]
            lines = seq[: bases // 60 * 60].reshape(-1, 60)
            f.write(f">chr{r}\n".encode())
            f.write(np.concatenate([lines, np.full((len(lines), 1), 10, np.uint8)], 1).tobytes())
            f.write(seq[bases // 60 * 60:].tobytes() + b"\n")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--records", type=int, default=8)
    ap.add_argument("--record-mbp", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    quiet = io.StringIO()
    opts = dict(min_count=3, shard_tokens=1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        genome = tmp / "g.fa"
        write_genome(genome, a.records, int(a.record_mbp * 1e6))
        rows = {k: [] for k in ("build", "count max", "table", "shard max", "finish",
                                "critical path", "task-seconds")}
        for _ in range(a.repeats):
            ref, work, out = tmp / "ref", tmp / "work", tmp / "out"
            for d in (ref, work, out):
                shutil.rmtree(d, ignore_errors=True)
            rows["build"].append(timed(lambda: build(BuildConfig(genome=genome, out_dir=ref,
                                                                 **opts), out=quiet)))
            cfg = BuildConfig(genome=genome, out_dir=work, **opts)
            counts = [timed(lambda i=i: count_stage(cfg, work, (i, a.groups), out=quiet))
                      for i in range(a.groups)]
            table = timed(lambda: table_stage(work, out=quiet))
            shards = [timed(lambda i=i: shard_stage(genome, work, (i, a.groups), out=quiet))
                      for i in range(a.groups)]
            finish = timed(lambda: finish_stage(work, out, out=quiet))
            assert Manifest.load(ref).shards == Manifest.load(out).shards, "datasets differ"
            rows["count max"].append(max(counts))
            rows["table"].append(table)
            rows["shard max"].append(max(shards))
            rows["finish"].append(finish)
            rows["critical path"].append(max(counts) + table + max(shards) + finish)
            rows["task-seconds"].append(sum(counts) + table + sum(shards) + finish)
    mbp = a.records * a.record_mbp
    print(f"genome: {a.records} records x {a.record_mbp} Mbp = {mbp:.0f} Mbp; {a.groups} groups; "
          f"median of {a.repeats} runs; datasets identical on every run")
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"  {k:14s} {v:7.2f} s")
    print(f"build / critical path (speed-up on {a.groups} nodes): "
          f"{med['build'] / med['critical path']:.2f}x")
    print(f"task-seconds / build (CPU cost of splitting): "
          f"{med['task-seconds'] / med['build']:.2f}x")


if __name__ == "__main__":
    main()
