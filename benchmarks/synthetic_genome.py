"""A large synthetic genome made from the bundled E. coli genome, for the preprocessing benchmarks.

Records are E. coli stretches at random offsets, half of them reverse-complemented, with 1 %
point changes (so no two records are copies), soft-masked (lower-case) stretches over about half
of the bases as in RepeatMasker'd assemblies, and runs of N: a gap at each record's ends
(telomeres) and scattered gaps of 1-50 kbp inside. Written as 60-column FASTA, plain or gzip,
record by record, so the writer needs memory for one record only.

    python benchmarks/synthetic_genome.py OUT.fa[.gz] --mbp 1000 --records 12
"""
from __future__ import annotations

import argparse
import gzip
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ECOLI = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
_COMPLEMENT = bytes.maketrans(b"ACGTacgt", b"TGCAtgca")


def _source() -> np.ndarray:
    lines = gzip.decompress(ECOLI.read_bytes()).split(b"\n")
    seq = b"".join(ln for ln in lines if not ln.startswith(b">")).upper()
    return np.frombuffer(seq, np.uint8)


def record(src: np.ndarray, length: int, rng: np.random.Generator) -> bytes:
    """One record of `length` bases."""
    out = np.empty(length, np.uint8)
    at = 0
    while at < length:
        n = min(length - at, int(rng.integers(200_000, 2_000_000)), len(src))
        start = int(rng.integers(0, len(src) - n + 1))
        chunk = src[start:start + n]
        if rng.random() < 0.5:
            chunk = np.frombuffer(chunk.tobytes()[::-1].translate(_COMPLEMENT), np.uint8)
        out[at:at + n] = chunk
        at += n
    change = rng.random(length) < 0.01
    out[change] = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, int(change.sum()))]
    # soft-masked stretches: about half the bases, in runs of 100 bp - 6 kbp
    runs = int(length * 0.5 / 3000)
    for s, n in zip(rng.integers(0, length, runs), rng.integers(100, 6000, runs)):
        out[s:s + n] |= 0x20                          # ASCII lower case
    # N gaps: 10 kbp at each end, and one gap of 1-50 kbp per ~2 Mbp inside
    tel = min(10_000, length // 10)
    out[:tel] = out[length - tel:] = ord("N")
    for s, n in zip(rng.integers(0, length, max(1, length // 2_000_000)),
                    rng.integers(1000, 50_000, max(1, length // 2_000_000))):
        out[s:s + n] = ord("N")
    return out.tobytes()


def _lines(seq: bytes, width: int = 60) -> bytes:
    full = len(seq) // width * width
    body = np.frombuffer(seq[:full], np.uint8).reshape(-1, width)
    text = np.hstack([body, np.full((len(body), 1), ord("\n"), np.uint8)]).tobytes()
    return text + (seq[full:] + b"\n" if full < len(seq) else b"")


def write_genome(path: Path, mbp: float, records: int, seed: int = 0) -> Path:
    """Write the genome (gzip when the name ends in .gz, level 1) and return its path."""
    rng = np.random.default_rng(seed)
    src = _source()
    total = int(mbp * 1e6)
    # record lengths from 0.5x to 1.5x the mean, summing to the total
    weights = rng.uniform(0.5, 1.5, records)
    lengths = np.floor(weights / weights.sum() * total).astype(np.int64)
    lengths[-1] += total - int(lengths.sum())
    tmp = path.with_name(f".tmp-{path.name}")
    gz = path.suffix == ".gz"
    with open(tmp, "wb") as f:
        z = zlib.compressobj(1, zlib.DEFLATED, 31) if gz else None
        for i, n in enumerate(lengths):
            text = f">chr{i + 1} synthetic from E. coli K-12\n".encode() + _lines(
                record(src, int(n), rng))
            f.write(z.compress(text) if z else text)
        if z:
            f.write(z.flush())
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mbp", type=float, default=1000)
    ap.add_argument("--records", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_genome(a.out, a.mbp, a.records, a.seed)
    print(a.out)


if __name__ == "__main__":
    main()
