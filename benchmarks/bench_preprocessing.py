"""`build` throughput with 1 and 2 workers, peak memory on a 1 Gbp genome, and the HuggingFace
text route, all in one invocation.

Genomes are made in a temporary directory from the bundled E. coli genome
(benchmarks/synthetic_genome.py: records of E. coli stretches with point changes, soft-masked
stretches, N gaps; gzip). Each measurement runs in a fresh subprocess, `build()` timed inside it
(interpreter start-up excluded), and the configurations are interleaved run by run so that a
drifting machine load hits all of them alike. Routes:
  --workers 1 / 2             the default build (pieces cached between the passes when the genome
                              fits in 256 MiB, so the file is decompressed once)
  no cache, --workers 1 / 2   the file read twice: what a genome larger than the cache (GRCh38)
                              takes; the GRCh38 estimate uses these figures
  HuggingFace                 DNABERT's preparation: space-separated 6-mer text of 510-token
                              samples through BertTokenizerFast built from our vocab.txt (ids
                              only; no NPMI, no files), on a slice of the genome, scaled
Peak RSS: of the build's own process and of its largest helper (VmHWM sampled while it runs; a
forked helper shares the arena and its parent's pages, so the two are not to be added up).

    python benchmarks/bench_preprocessing.py [--mbp 100] [--runs 3] [--rss-mbp 1000]
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


def write_genome(path: Path, mbp: float, records: int, seed: int) -> Path:
    """benchmarks/synthetic_genome.py in a subprocess: this process stays small, so the peak
    RSS its children report (which counts what they inherit at fork) is theirs."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synthetic_genome.py"), str(path),
                    "--mbp", str(mbp), "--records", str(records), "--seed", str(seed)],
                   check=True, capture_output=True)
    return path

_OURS = r"""
import io, json, os, resource, shutil, sys, threading, time
from preprocessing.build import BuildConfig, build
genome, out, workers, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
helper_peak = {}          # pid -> VmHWM (KiB) of the build's helpers, sampled while they run

def sample():
    me = os.getpid()
    while True:
        try:
            kids = open(f"/proc/{me}/task/{me}/children").read().split()
        except OSError:
            return
        for pid in kids:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmHWM:"):
                        helper_peak[pid] = max(helper_peak.get(pid, 0), int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
cpu = lambda who: (lambda r: r.ru_utime + r.ru_stime)(resource.getrusage(who))
main0, helpers0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
t = time.perf_counter()
m = build(BuildConfig(genome=genome, out_dir=out, workers=workers, cache_bytes=cache),
          out=io.StringIO())
s = time.perf_counter() - t
cpu_main, cpu_helpers = cpu(resource.RUSAGE_SELF) - main0, cpu(resource.RUSAGE_CHILDREN) - helpers0
shutil.rmtree(out)
print(json.dumps({"seconds": s, "bases": m.stats["bases"], "cpu_main": cpu_main,
                  "cpu_helpers": cpu_helpers,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "worker_rss_kib": max(helper_peak.values(), default=0),
                  "tokens": sum(x["tokens"] for x in m.shards)}))
"""

_HF = r"""
import gzip, json, resource, sys, time, tempfile
from pathlib import Path
genome, bases = sys.argv[1], int(sys.argv[2])
from transformers import BertTokenizerFast
from cmgems.data.tokens import kmerize, write_vocab
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


def _run(code: str, *args) -> dict:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"run failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t
    return out


def _row(results: list[dict]) -> dict:
    secs = statistics.median(r["seconds"] for r in results)
    return {"seconds": secs, "mbps": results[0]["bases"] / secs / 1e6,
            "rss_mib": max(r["rss_kib"] for r in results) / 1024,
            "worker_rss_mib": max(r.get("worker_rss_kib", 0) for r in results) / 1024,
            "all": [round(r["seconds"], 2) for r in results], "bases": results[0]["bases"],
            "cpu_main": statistics.median(r.get("cpu_main", 0) for r in results),
            "cpu_helpers": statistics.median(r.get("cpu_helpers", 0) for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbp", type=float, default=100, help="size of the speed genome")
    ap.add_argument("--records", type=int, default=4, help="records of the speed genome")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-mbp", type=float, default=1000,
                    help="size of the memory genome (12 records); 0 skips it")
    ap.add_argument("--hf-bases", type=int, default=500_000,
                    help="slice of the genome for the (slow) HuggingFace route")
    ap.add_argument("--tmp", type=Path, default=None, help="directory for genomes and outputs")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="bench-prep-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        genome = write_genome(tmp / "speed.fa.gz", a.mbp, a.records, seed=1)
        print(f"made {genome.name}: {a.mbp:g} Mbp in {a.records} records, "
              f"{genome.stat().st_size / 1e6:.0f} MB gzip, {time.perf_counter() - t:.0f} s",
              flush=True)
        configs = [("--workers 1", 1, 256 << 20), ("--workers 2", 2, 256 << 20),
                   ("no cache, --workers 1", 1, 0), ("no cache, --workers 2", 2, 0)]
        per = {name: [] for name, _, _ in configs}
        for i in range(a.runs):
            for name, w, cache in configs:
                per[name].append(_run(_OURS, genome, tmp / f"out-{w}-{cache}", w, cache))
        rows = {name: _row(per[name]) for name, _, _ in configs}
        hf = _row([_run(_HF, genome, a.hf_bases) for _ in range(max(1, a.runs // 2))])
        rss = None
        if a.rss_mbp:
            t = time.perf_counter()
            big = write_genome(tmp / "memory.fa.gz", a.rss_mbp, 12, seed=2)
            made = time.perf_counter() - t
            rss = {w: _run(_OURS, big, tmp / f"out-big-{w}", w, 256 << 20) for w in (1, 2)}
            big_size = big.stat().st_size
            big.unlink()

    print(f"cpus: {os.cpu_count()}, load average (1 min) before/after: {load_before:.1f} / "
          f"{os.getloadavg()[0]:.1f}")
    print(f"speed genome: {rows['--workers 1']['bases'] / 1e6:.1f} Mbp ({a.records} records); "
          f"median of {a.runs} runs (HuggingFace: {max(1, a.runs // 2)} runs on "
          f"{hf['bases'] / 1e6:.2f} Mbp, scaled)")
    print(f"{'route':28s} {'s (build)':>10s} {'Mbp/s':>8s} {'RSS MiB':>8s} {'worker':>7s}  runs")
    for name, r in rows.items():
        print(f"{name:28s} {r['seconds']:10.2f} {r['mbps']:8.1f} {r['rss_mib']:8.0f} "
              f"{r['worker_rss_mib']:7.0f}  {r['all']}")
    hf_s = hf["seconds"] * rows["--workers 1"]["bases"] / hf["bases"]
    print(f"{'HuggingFace BertTokenizerFast':28s} {hf_s:10.2f} {hf['mbps']:8.2f} "
          f"{hf['rss_mib']:8.0f} {'-':>7s}  {hf['all']}")
    one, two = rows["--workers 1"]["mbps"], rows["--workers 2"]["mbps"]
    one_nc, two_nc = rows["no cache, --workers 1"]["mbps"], rows["no cache, --workers 2"]["mbps"]
    print(f"speed-up, 2 workers over 1: {two / one:.2f}x (cached), {two_nc / one_nc:.2f}x "
          f"(no cache)")
    # What two free cores would give, whatever else runs: one worker's CPU time over the CPU
    # time of the busier of the two processes of a 2-worker build (this one, which also reads
    # the genome, and its helper).
    for label, a1, a2 in (("cached", "--workers 1", "--workers 2"),
                          ("no cache", "no cache, --workers 1", "no cache, --workers 2")):
        r1, r2 = rows[a1], rows[a2]
        total1 = r1["cpu_main"] + r1["cpu_helpers"]
        busiest = max(r2["cpu_main"], r2["cpu_helpers"])
        print(f"CPU s ({label}): 1 worker {total1:.2f}; 2 workers: main {r2['cpu_main']:.2f} "
              f"(reads the genome), helper {r2['cpu_helpers']:.2f}; 1 worker / busiest = "
              f"{total1 / busiest:.2f}x")
    print(f"ours (--workers 1) vs HuggingFace route: {one / hf['mbps']:.0f}x faster "
          f"({one:.1f} vs {hf['mbps']:.2f} Mbp/s)")
    for label, mbps in (("--workers 1", one_nc), ("--workers 2", two_nc)):
        print(f"GRCh38 (3.1 Gbp, file read twice) estimate, {label}: "
              f"{GRCH38_BP / mbps / 1e6 / 60:.1f} min")
    if rss:
        twice = ", read twice (larger than the 256 MiB cache)" if a.rss_mbp * 1e6 > 256 << 20 \
            else ""
        print(f"memory genome: {a.rss_mbp:g} Mbp in 12 records ({big_size / 1e6:.0f} MB gzip, "
              f"made in {made:.0f} s){twice}:")
        for w, r in rss.items():
            print(f"  --workers {w}: {r['seconds']:.1f} s ({r['bases'] / r['seconds'] / 1e6:.1f}"
                  f" Mbp/s), peak RSS {r['rss_kib'] / 1024:.0f} MiB (largest worker "
                  f"{r['worker_rss_kib'] / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
