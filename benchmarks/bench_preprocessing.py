"""End-to-end `build` throughput (Mbp/s) and peak RSS, beside the HuggingFace text route.

Each measurement runs in a fresh subprocess (so peak RSS is that run's own): `build()` timed
inside it (the figure a long genome sees; interpreter start-up excluded, reported apart as the
CLI's wall time). Routes:
  ours, --workers 1 / 2          the default build (pieces cached between the passes when the
                                 genome fits in 256 MiB, so the file is decompressed once)
  ours, no cache, --workers 1/2  the file read twice: what a genome larger than the cache
                                 (GRCh38) takes; the GRCh38 estimate uses these figures
  HuggingFace                    DNABERT's preparation: space-separated 6-mer text of 510-token
                                 samples through BertTokenizerFast built from our vocab.txt
                                 (ids only; no NPMI, no files), on a slice of the genome, scaled
Median of --runs runs each, all in the same invocation.

    python benchmarks/bench_preprocessing.py [--genome data/ecoli_k12_mg1655.fa.gz] [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRCH38_BP = 3.1e9

_OURS = r"""
import io, json, resource, sys, time
from preprocessing.build import BuildConfig, build
genome, out, workers, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
m = build(BuildConfig(genome=genome, out_dir=out, workers=workers, cache_bytes=cache), out=io.StringIO())
s = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": s, "bases": m.stats["bases"], "rss_kib": rss,
                  "tokens": sum(x["tokens"] for x in m.shards)}))
"""

_HF = r"""
import gzip, json, resource, sys, time, tempfile
from pathlib import Path
genome, bases = sys.argv[1], int(sys.argv[2])
from transformers import BertTokenizerFast
from cmgems.tokens import kmerize, write_vocab
vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
write_vocab(vocab, 6)
tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=False)
t = time.perf_counter()
with gzip.open(genome, "rt") as f:
    seq = "".join(l.strip() for l in f if not l.startswith(">"))[:bases].upper()
lines = [kmerize(seq[i:i + 515], 6) for i in range(0, len(seq) - 515 + 1, 510)]
ids = tok(lines, add_special_tokens=True)["input_ids"]
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "bases": len(seq), "tokens": sum(len(x) - 2 for x in ids),
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _run(code: str, *args) -> tuple[dict, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise SystemExit(f"run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), wall


def _median_runs(code: str, runs: int, make_args) -> dict:
    results = [_run(code, *make_args(i)) for i in range(runs)]
    secs = statistics.median(r["seconds"] for r, _ in results)
    first = results[0][0]
    return {"seconds": secs, "mbps": first["bases"] / secs / 1e6, "bases": first["bases"],
            "rss_mib": max(r["rss_kib"] for r, _ in results) / 1024,
            "wall": statistics.median(w for _, w in results), "tokens": first["tokens"],
            "all": [round(r["seconds"], 3) for r, _ in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genome", type=Path, default=ROOT / "data" / "ecoli_k12_mg1655.fa.gz")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hf-bases", type=int, default=500_000,
                    help="slice of the genome for the (slow) HuggingFace route")
    a = ap.parse_args()
    genome = a.genome.resolve()
    load_before = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        # interleave configurations run by run, so drifting machine load hits all of them alike
        configs = [("ours, --workers 1", 1, 256 << 20), ("ours, --workers 2", 2, 256 << 20),
                   ("ours, no cache, --workers 1", 1, 0), ("ours, no cache, --workers 2", 2, 0)]
        per = {name: [] for name, _, _ in configs}
        for i in range(a.runs):
            for name, w, cache in configs:
                per[name].append(_run(_OURS, genome, f"{tmp}/o-{w}-{cache}-{i}", w, cache))
        for name, _, _ in configs:
            results = per[name]
            secs = statistics.median(r["seconds"] for r, _ in results)
            rows[name] = {"seconds": secs, "mbps": results[0][0]["bases"] / secs / 1e6,
                          "rss_mib": max(r["rss_kib"] for r, _ in results) / 1024,
                          "wall": statistics.median(w for _, w in results),
                          "all": [round(r["seconds"], 3) for r, _ in results]}
        hf = _median_runs(_HF, max(1, a.runs // 2), lambda i: (genome, a.hf_bases))
        rows["HuggingFace BertTokenizerFast"] = hf

    bases = per["ours, --workers 1"][0][0]["bases"]
    # the machine may be shared: other jobs' load changes every figure below
    print(f"cpus: {os.cpu_count()}, load average (1 min) before/after: {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    print(f"genome: {genome.name}, {bases / 1e6:.2f} Mbp; median of {a.runs} runs "
          f"(HuggingFace: {max(1, a.runs // 2)} runs on {hf['bases'] / 1e6:.2f} Mbp, scaled)")
    print(f"{'route':32s} {'s (build)':>10s} {'Mbp/s':>8s} {'peak RSS MiB':>13s} {'CLI wall s':>11s}"
          f"  runs")
    for name, r in rows.items():
        secs = r["seconds"] * (bases / r["bases"] if "bases" in r else 1)
        print(f"{name:32s} {secs:10.3f} {r['mbps']:8.1f} {r['rss_mib']:13.0f} {r['wall']:11.2f}"
              f"  {r['all']}")
    one, two = rows["ours, --workers 1"]["mbps"], rows["ours, --workers 2"]["mbps"]
    one_nc, two_nc = (rows["ours, no cache, --workers 1"]["mbps"],
                      rows["ours, no cache, --workers 2"]["mbps"])
    print(f"speed-up, 2 workers over 1: {two / one:.2f}x (cached), {two_nc / one_nc:.2f}x "
          f"(no cache)")
    print(f"ours (--workers 1) vs HuggingFace route: {one / hf['mbps']:.1f}x faster "
          f"({one:.1f} vs {hf['mbps']:.2f} Mbp/s)")
    for label, mbps in (("--workers 1", one_nc), ("--workers 2", two_nc)):
        print(f"GRCh38 (3.1 Gbp, file read twice) estimate, {label}: "
              f"{GRCH38_BP / mbps / 1e6 / 60:.1f} min")
    print(f"GRCh38 with the HuggingFace route: {GRCH38_BP / hf['mbps'] / 1e6 / 3600:.1f} h")


if __name__ == "__main__":
    main()
