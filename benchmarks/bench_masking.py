"""Masking throughput: samples/s of select + corrupt per strategy on real E. coli batches.

Batches of 64 x 512 ([CLS] + 510 6-mer tokens + [SEP]) cut from the bundled E. coli genome, NPMI
from GeneMask's GRCh38 table where ../shared/data holds it, else from the bundled E. coli dataset's
own npmi.tsv (built if missing); --npmi names another table (our TSV or GeneMask's CSV). Each figure is the median of several timed runs; the baseline, a
per-sample Python GeneMask (loops over samples, centres and span positions, as the public
GeneMask code does) followed by the same corruption, is measured in the same run.

    python benchmarks/bench_masking.py                 # one CPU thread
    python benchmarks/bench_masking.py --device cuda
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DATA_DIR, ensure_data  # noqa: E402
from cmgems.masking import maskings  # noqa: E402
from cmgems.data.npmi_table import load_table  # noqa: E402
from cmgems.data.tokens import CLS_ID, NUM_SPECIAL, SEP_ID, kmer_ids, vocab_size  # noqa: E402

ECOLI = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
NPMI_CSV = ROOT.parent / "shared" / "data" / "npmi" / "hg38_6mer_npmi_genemask.csv"
TARGET = 50_000  # samples/s on one CPU thread, every strategy
V6 = vocab_size(6)


def load_batches(n_batches: int, batch: int, tokens: int, npmi_csv: Path, seed: int = 0):
    with gzip.open(ECOLI, "rt") as f:
        seq = "".join(line.strip() for line in f if not line.startswith(">"))
    ids = torch.from_numpy(kmer_ids(seq, 6))
    by_code = torch.from_numpy(load_table(npmi_csv, 6))          # NPMI per k-mer code
    table = torch.full((V6,), float("nan"))
    table[NUM_SPECIAL:NUM_SPECIAL + len(by_code)] = by_code
    n = n_batches * batch
    starts = torch.from_numpy(np.random.default_rng(seed).integers(0, len(ids) - tokens, n))
    rows = ids[starts.unsqueeze(1) + torch.arange(tokens)]
    full = torch.cat([torch.full((n, 1), CLS_ID), rows, torch.full((n, 1), SEP_ID)], 1)
    npmi = table[full]
    mask = torch.ones_like(full)
    return [(full[i:i + batch], npmi[i:i + batch], mask[i:i + batch])
            for i in range(0, n, batch)]


def genemask_per_sample(input_ids: torch.Tensor, npmi: torch.Tensor, attention_mask: torch.Tensor,
                        p: float, rng: random.Random) -> torch.Tensor:
    """Straightforward GeneMask: Python loops over samples, centres and span positions."""
    selected = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b in range(input_ids.shape[0]):
        length = int(attention_mask[b].sum()) - 2
        values = npmi[b].tolist()
        chosen = set()
        centres = [t for t in range(1, length + 1) if rng.random() < p]
        anchors = []
        for t in centres:
            best, best_value = None, -math.inf
            for j in range(max(1, t - 2), min(length, t + 3) + 1):
                chosen.add(j)
                v = values[j] if math.isfinite(values[j]) else -math.inf
                if best is None or v > best_value:
                    best, best_value = j, v
            anchors.append((best_value, best))
        anchors.sort(reverse=True)
        if len(anchors) >= 9:
            anchors = anchors[:math.ceil(len(anchors) / 2)]
        for _, a in anchors:
            for j in range(max(1, a - 5), min(length, a + 5) + 1):
                chosen.add(j)
        if chosen:
            selected[b, sorted(chosen)] = True
    return selected


def time_runs(fn, batches, runs: int, repeats: int, sync) -> tuple[list[float], list[float]]:
    """samples/s of each run by wall clock and by this thread's CPU time; a run masks `repeats`
    batches. On a shared machine the CPU-time figure is what the code costs, the wall-clock one
    also holds the time other processes took the core away."""
    fn(batches[0])  # warm-up
    sync()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for i in range(repeats):
            fn(batches[i % len(batches)])
        sync()
        samples = repeats * batches[0][0].shape[0]
        wall.append(samples / (time.perf_counter() - start))
        cpu.append(samples / max(time.thread_time() - start_cpu, 1e-9))
    return wall, cpu


def _row(name: str, wall: list[float], cpu: list[float], note: str) -> str:
    return (f"{name:<10} {statistics.median(wall):>11,.0f} {min(wall):>10,.0f} "
            f"{max(wall):>10,.0f} {statistics.median(cpu):>11,.0f}  {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--generator-device", default=None,
                    help="device of the torch.Generator (default: --device; cpu on a cuda run "
                         "gives the CPU-identical selections)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7, help="timed runs; the median is reported")
    ap.add_argument("--repeats", type=int, default=40, help="batches per timed run")
    ap.add_argument("--baseline-repeats", type=int, default=2, help="batches per baseline run")
    ap.add_argument("--npmi", type=Path, help="NPMI table (default: GeneMask's GRCh38 CSV in "
                    "../shared/data if there, else the bundled E. coli dataset's npmi.tsv)")
    args = ap.parse_args(argv)
    if args.npmi is None:
        args.npmi = NPMI_CSV if NPMI_CSV.is_file() else DATA_DIR / "npmi.tsv"
        if not NPMI_CSV.is_file():
            ensure_data(DATA_DIR)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen_device = torch.device(args.generator_device or args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = load_batches(8, args.batch, 510, args.npmi)
    dev_batches = [tuple(t.to(device) for t in b) for b in batches]
    gen = torch.Generator(device=gen_device).manual_seed(0)

    print(f"device {device} (generator on {gen_device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), batches {args.batch} x 512 E. coli tokens, "
          f"median of {args.runs} runs x {args.repeats} batches, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; NPMI {args.npmi}")
    print(f"{'':<10} {'wall clock samples/s':>33} {'CPU time':>11}")
    print(f"{'strategy':<10} {'median':>11} {'min':>10} {'max':>10} {'median':>11}  "
          f"(target {TARGET:,})")
    results = {}
    for name in maskings.MASKINGS:
        def step(b, name=name):
            return maskings.mask_batch(b[0], b[1], b[2], name, V6, gen)
        wall, cpu = time_runs(step, dev_batches, args.runs, args.repeats, sync)
        results[name] = (statistics.median(wall), statistics.median(cpu))
        verdict = "ok" if results[name][0] >= TARGET else (
            "BELOW (CPU time ok: core shared)" if device.type == "cpu"
            and results[name][1] >= TARGET else "BELOW")
        print(_row(name, wall, cpu, verdict))

    rng = random.Random(0)
    cpu_gen = torch.Generator().manual_seed(0)

    def baseline(b):
        sel = genemask_per_sample(b[0], b[1], b[2], maskings.DEFAULT_PROBABILITY["genemask"], rng)
        return maskings.corrupt(b[0], sel, V6, cpu_gen)
    wall, cpu = time_runs(baseline, batches, args.runs, args.baseline_repeats, lambda: None)
    base = (statistics.median(wall), statistics.median(cpu))
    print(_row("baseline", wall, cpu, "per-sample Python GeneMask + the same corrupt, CPU"))
    print(f"genemask speed-up over the baseline: {results['genemask'][0] / base[0]:,.1f}x "
          f"wall clock, {results['genemask'][1] / base[1]:,.1f}x CPU time")

    print("mask fractions over 512 samples (selected / real tokens, spans per sample, "
          "mean NPMI selected vs all):")
    ids = torch.cat([b[0] for b in batches]).to(device)
    npmi = torch.cat([b[1] for b in batches]).to(device)
    mask = torch.cat([b[2] for b in batches]).to(device)
    for name in maskings.MASKINGS:
        sel = maskings.select(name, ids, npmi, mask, torch.Generator(device=gen_device)
                             .manual_seed(1))
        s = maskings.mask_stats(sel, npmi, mask, name)
        print(f"  {name:<10} {s['selected_fraction']:.4f}  spans {s['spans_per_sample']:.2f}  "
              f"NPMI {s['npmi_selected']:.3f} vs {s['npmi_real']:.3f}")
    sel = genemask_per_sample(ids.cpu(), npmi.cpu(), mask.cpu(),
                              maskings.DEFAULT_PROBABILITY["genemask"], random.Random(1))
    print(f"  {'baseline':<10} {sel.float().mean().item() * 512 / 510:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
