"""Shared fixtures: small real datasets on disk, built once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test and every process it starts on one thread: the suite runs several processes at once
# on small CI machines, where N processes x all cores each is many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LAMBDA = SHARED / "genomes" / "lambda_phage.fa.gz"
ECOLI = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"


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


@pytest.fixture(scope="session")
def lambda_fasta() -> Path:
    return LAMBDA


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
