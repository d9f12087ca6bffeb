"""Shared fixtures: small real datasets on disk, built once per test session.

Everything here comes from the two genomes the project ships in data/ (see data/README.md): the
suite passes on a plain clone. The development data beside the project's own checkout (../shared,
GeneMask's GPL-3.0 files among them) is read only by optional checks, through `shared_file`,
which skip with a stated reason when it is absent.
"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Every test and every process it starts on one thread: the suite runs several processes at once
# on small CI machines, where N processes x all cores each is many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
LAMBDA = ROOT / "data" / "lambda_phage.fa.gz"
ECOLI = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
SHARED = ROOT.parent / "shared" / "data"
# GeneMask's published table's columns that a table computed here can fill, in its order.
GENEMASK_COLUMNS = ("ngram", "dp.true.pmi", "norm_dp_true_pmi", "ngram_size", "norm_pmi_rank_rel")


def shared_file(relative: str) -> Path:
    """A file of the development data beside the checkout (../shared/data), for an optional check:
    skips the test, saying why, where it is absent (any user's clone)."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(reason=f"optional check: {path} is absent (development data beside the "
                    "project's own checkout, not part of the project)")
    return path


def run_module(*args, cwd=ROOT, env=None, timeout=600, check=True):
    """Run `python -m ...`/a script in a subprocess with the test interpreter; return the result."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} exited {res.returncode}\nstdout:\n{res.stdout[-4000:]}\n"
                             f"stderr:\n{res.stderr[-4000:]}")
    return res


def read_genome(path: Path) -> str:
    """The bases of a one-record gzip FASTA, upper case."""
    with gzip.open(path, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">")).upper()


def write_genemask_csv(our_tsv: Path, path: Path) -> Path:
    """Our npmi.tsv rewritten in the layout of GeneMask's published table (Data-A): a CSV sorted
    by NPMI, highest first, with the columns of GENEMASK_COLUMNS (its k-mer in `ngram`, its NPMI
    in `norm_dp_true_pmi`, the rank among k-mers of this size in `norm_pmi_rank_rel`)."""
    lines = [ln for ln in our_tsv.read_text().splitlines() if ln and not ln.startswith("#")]
    header, rows = lines[0].split("\t"), [ln.split("\t") for ln in lines[1:]]
    col = {name: header.index(name) for name in ("kmer", "pmi", "npmi", "rank")}
    scored = sorted((r for r in rows if r[col["rank"]]), key=lambda r: int(r[col["rank"]]))
    out = [",".join(GENEMASK_COLUMNS)]
    out += [f"{r[col['kmer']]},{r[col['pmi']]},{r[col['npmi']]},{len(r[col['kmer']])},"
            f"{r[col['rank']]}" for r in scored]
    path.write_text("\n".join(out) + "\n")
    return path


def kmer_text(seq: str, k: int = 6) -> str:
    """GeneMask's few-shot spelling of a sequence: its overlapping k-mers, space-separated."""
    return " ".join(seq[i:i + k] for i in range(len(seq) - k + 1))


def write_fewshot_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    """A few-shot file in GeneMask's TSV format: header "sequence" "label", quoted k-mer text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('"sequence"\t"label"\n'
                    + "".join(f'"{kmer_text(s)}"\t{y}\n' for s, y in rows))
    return path


@pytest.fixture(scope="session")
def lambda_fasta() -> Path:
    return LAMBDA


@pytest.fixture(scope="session")
def genemask_csv(tmp_path_factory) -> Path:
    """A 6-mer NPMI table in GeneMask's CSV layout, computed here from the bundled E. coli genome
    (min count 10: all 4,096 6-mers are scored, as in GeneMask's table)."""
    d = tmp_path_factory.mktemp("npmi")
    run_module("-m", "preprocessing", "npmi", str(ECOLI), str(d / "npmi.tsv"), "--min-count", "10")
    return write_genemask_csv(d / "npmi.tsv", d / "ecoli_6mer_npmi_genemask.csv")


@pytest.fixture(scope="session")
def prom_core(tmp_path_factory) -> Path:
    """A few-shot task laid out as GeneMask's prom-core folder (10/train.tsv: 10 examples per
    class; test.tsv one level up: 100 per class), made from the bundled genomes: 70 bp windows of
    phage lambda (label 1) against E. coli (label 0), disjoint, rows in seeded random order."""
    root = tmp_path_factory.mktemp("fewshot") / "prom-core"
    rng = np.random.default_rng(0)
    length, train_n, test_n = 70, 10, 100
    windows = {}
    for label, genome in ((1, LAMBDA), (0, ECOLI)):
        seq = read_genome(genome)
        tiles = rng.choice(len(seq) // length, train_n + test_n, replace=False) * length
        windows[label] = [seq[t:t + length] for t in tiles]
    for path, part in ((root / "10" / "train.tsv", slice(0, train_n)),
                       (root / "test.tsv", slice(train_n, None))):
        rows = [(w, y) for y in (0, 1) for w in windows[y][part]]
        write_fewshot_tsv(path, [rows[i] for i in rng.permutation(len(rows))])
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Shards of the lambda phage genome (48 kbp, k=6, min count 5): a real dataset in seconds."""
    out = tmp_path_factory.mktemp("data") / "lambda"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(out), "--min-count", "5",
               "--valid-fraction", "0.1", "--seed", "0", "--shard-tokens", "20000")
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real Slurm on this host (nodes n1 and n2, 2 CPUs each), for the module's tests."""
    from slurm_cluster import SlurmCluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(reason=f"slurm packages not installed: no {', '.join(missing)} "
                    "(apt-get install slurmctld slurmd slurm-client munge, or ./install.sh --test)")
    if os.geteuid() != 0:
        pytest.skip(reason="the test cluster runs slurmd as root (SlurmdUser=root); run as root")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=("n1", "n2"), cpus=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()
