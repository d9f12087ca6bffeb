"""Few-shot and GUE-format task files made inside the tests, from the genome the project ships
(data/ecoli_k12_mg1655.fa.gz) or random sequence, so no test needs ../shared."""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

ECOLI = Path(__file__).resolve().parents[1] / "data" / "ecoli_k12_mg1655.fa.gz"
TSV_HEAD = '"sequence"\t"label"\n'


@functools.lru_cache(maxsize=1)
def ecoli() -> str:
    with gzip.open(ECOLI, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">")).upper()


def genome_windows(rng: np.random.Generator, n: int, length: int) -> list[str]:
    """n windows of the bundled genome at random places (it is all A/C/G/T)."""
    g = ecoli()
    starts = rng.integers(0, len(g) - length, n)
    return [g[s:s + length] for s in starts]


def kmer_text(seq: str, k: int = 6) -> str:
    """GeneMask's few-shot sequence field: overlapping k-mers separated by spaces."""
    return " ".join(seq[i:i + k] for i in range(len(seq) - k + 1))


def write_fewshot_tsv(path: Path, rows, k: int = 6) -> Path:
    """rows: (nucleotides, label); written as GeneMask's quoted TSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TSV_HEAD + "".join(f'"{kmer_text(s, k)}"\t{y}\n' for s, y in rows))
    return path


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sequence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return path


def easy_rows(rng, n, length=40):
    """Class 0: A/T-only sequences, class 1: C/G-only: separable by any working finetuning."""
    out = []
    for i in range(n):
        y = i % 2
        out.append(("".join(rng.choice(list("AT" if y == 0 else "CG"), length)), y))
    return out


def shuffled_pool(rng: np.random.Generator, per_class: list[int], length: int = 40):
    """Genome windows with labels, per_class[c] of class c, in shuffled order (a few-shot file
    that is neither one draw nor consecutive blocks)."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    rng.shuffle(labels)
    seqs = genome_windows(rng, len(labels), length)
    return list(zip(seqs, labels.tolist()))
