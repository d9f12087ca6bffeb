"""Throughput of `cmgems embed` against the transformers feature-extraction pipeline on the same
sequences, in the same run: regions/s and real (k-mer) tokens/s, each the median of several runs.

Regions: --regions BED-style regions of --length bp (or lengths uniform in
--min-length..--length) drawn (seeded) from the bundled E. coli genome, read through
cmgems.use.genome (pyfaidx) from a plain copy in a temporary folder. The model: --model an
export, else a fresh LOGO export (seeded random weights: throughput does not depend on them) with
512 positions, so a region of up to 515 bp (510 tokens) is one window for embed and fits the
pipeline without cutting: both see exactly the same tokens. The pipeline's per-token features are
mean-pooled over the real tokens afterwards, as a user would; the largest difference between
the two sets of vectors is printed too.

    python benchmarks/bench_embed.py                       # CPU, 1 thread, 500 bp regions
    python benchmarks/bench_embed.py --min-length 100 --length 515    # mixed lengths
    python benchmarks/bench_embed.py --device cuda --regions 2048
"""
from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import GENOME, markdown_table
from cmgems.use.embed import embed
from cmgems.use.genome import Genome, Region
from cmgems.use.windows import load_model


def fresh_export(out: Path) -> Path:
    from transformers import BertForMaskedLM

    from cmgems.model.architectures import bert_config, export
    torch.manual_seed(0)
    config = bert_config("logo", 6)
    export(BertForMaskedLM(config).state_dict(), config, out, {"max_length": 512})
    return out


def draw_regions(genome: Genome, n: int, lengths: tuple[int, int], seed: int) -> list[Region]:
    """n regions, lengths uniform in [low, high] bases, starts uniform over the contig."""
    (chrom, size), = genome.lengths.items()
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lengths[0], lengths[1] + 1, n)
    starts = rng.integers(0, size - lengths[1], n)
    return [Region(f"{chrom}:{s}-{s + m}(.)", genome.fetch(chrom, int(s), int(s + m)))
            for s, m in zip(starts, sizes)]


def pipeline_vectors(fe, seqs: list[str], batch_size: int, k: int) -> np.ndarray:
    out = fe(seqs, batch_size=batch_size, truncation=True)
    # each item: [1][positions][hidden], [CLS] first, then the k-mers, [SEP], and the padding
    # of its batch (the pipeline keeps it): the mean over the real k-mers only
    return np.stack([np.asarray(o[0], dtype=np.float32)[1:len(s) - k + 2].mean(0)
                     for o, s in zip(out, seqs)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="an export (default: a fresh LOGO)")
    p.add_argument("--regions", type=int, default=256)
    p.add_argument("--length", type=int, default=500, help="bases per region (the most)")
    p.add_argument("--min-length", type=int, default=None,
                   help="the fewest bases per region (default: --length, all the same)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="embed's precision (auto: bf16 on a GPU that has it); the pipeline: fp32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import pipeline
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = tmp / "ecoli.fa"
        with gzip.open(GENOME, "rb") as f:
            plain.write_bytes(f.read())
        model_dir = args.model or fresh_export(tmp / "export")
        with Genome(plain) as g:
            regions = draw_regions(g, args.regions, (args.min_length or args.length, args.length),
                                   args.seed)
        loaded = load_model(model_dir, "base", device=args.device, precision=args.precision)
        seqs = [r.seq for r in regions]
        tokens = sum(len(s) - loaded.k + 1 for s in seqs)
        fe = pipeline("feature-extraction", model=str(model_dir), trust_remote_code=True,
                      device=torch.device(args.device), dtype=torch.float32)
        times = {"cmgems embed": [], "feature-extraction pipeline": []}
        ours = theirs = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours = embed(loaded, regions, batch_size=args.batch_size, progress=False)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            times["cmgems embed"].append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs = pipeline_vectors(fe, seqs, args.batch_size, loaded.k)
            times["feature-extraction pipeline"].append(time.perf_counter() - t)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"route": name, "seconds": med, "regions_s": len(regions) / med,
                     "tokens_s": tokens / med})
    rows[0]["ratio"] = rows[1]["seconds"] / rows[0]["seconds"]
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else \
        f"CPU, {args.threads} thread(s)"
    span = f"{args.min_length}-{args.length}" if args.min_length else f"{args.length}"
    print(f"{len(regions)} regions of {span} bp ({tokens:,} k-mer tokens), batch "
          f"{args.batch_size}, {device}, embed precision {loaded.precision}, median of "
          f"{args.repeats}")
    print(markdown_table(rows, [("route", "route", "{}"), ("seconds", "s", "{:.2f}"),
                                ("regions_s", "regions/s", "{:,.0f}"),
                                ("tokens_s", "real tokens/s", "{:,.0f}"),
                                ("ratio", "speed-up", "{:.2f}x")]))
    print(f"largest |embed - pipeline mean-pool| difference: {np.abs(ours - theirs).max():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
