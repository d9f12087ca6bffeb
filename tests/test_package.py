"""The distribution a user's `pip install .` makes: what the wheel holds, and every entry point run
from that installation in an empty folder, with no checkout on the path."""
from __future__ import annotations

import configparser
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SHIPPED = ("cmgems/launchers/configs/quick.yaml", "cmgems/launchers/configs/paper.yaml",
           "cmgems/launchers/configs/paper-logo.yaml", "cmgems/launchers/configs/reference.yaml",
           "cmgems/launchers/slurm/pretrain.sbatch", "cmgems/launchers/slurm/rank_env.sh",
           "cmgems/launchers/slurm/preprocess.sbatch", "cmgems/ds_configs/zero2.json",
           "cmgems/ds_configs/zero2-offload.json", "cmgems/genomes/ecoli_k12_mg1655.fa.gz",
           "cmgems/genomes/lambda_phage.fa.gz", "cmgems/preprocessing/__main__.py",
           "cmgems/launchers/cli.py", "cmgems/model/tokenizer.py")


def console_scripts() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return [line.split("=")[0].strip() for line in lines]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout, installed (without its dependencies, which the test
    interpreter has) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("dist")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(tmp / "wheel"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp / "wheel").glob("cmgems-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(tmp / "site"), str(wheel)], check=True, capture_output=True)
    return tmp


def run_installed(installed: Path, cwd: Path, *cmd: str, check=True, timeout=300):
    """A command of the installation, in `cwd`, with only the installation before the test
    interpreter's own packages on the path (the checkout is not there)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed / "site"), PYTHONUNBUFFERED="1",
               PATH=f"{installed / 'site' / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    res = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res


def test_wheel_puts_only_cmgems_into_site_packages(installed):
    (wheel,) = (installed / "wheel").glob("cmgems-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cmgems"}, top
    missing = [f for f in SHIPPED if f not in names]
    assert not missing, missing
    assert not any(n.startswith(("cmgems/tests", "cmgems/docs", "cmgems/benchmarks"))
                   for n in names)


def test_every_entry_point_runs_from_an_empty_folder(installed, tmp_path):
    where = run_installed(installed, tmp_path, sys.executable, "-c",
                          "import cmgems, cmgems.preprocessing, cmgems.launchers.cli; "
                          "print(cmgems.__file__)")
    assert where.stdout.strip().startswith(str(installed / "site")), where.stdout
    for script in console_scripts():
        res = run_installed(installed, tmp_path, script, "--help")
        assert "usage" in res.stdout.lower() or script == "cmgems", (script, res.stdout[:300])
    # pretrain's help shows the shipped default config's values
    help_text = " ".join(run_installed(installed, tmp_path, "cmgems-pretrain", "--help")
                         .stdout.split())
    assert "quick.yaml" in help_text and "(default: 200)" in help_text
    for command in ("build", "npmi", "pretrain", "finetune", "gue", "compare", "gue-compare"):
        run_installed(installed, tmp_path, "cmgems", command, "--help")
    assert run_installed(installed, tmp_path, "cmgems", "nope", check=False).returncode == 2
    assert list(tmp_path.iterdir()) == []  # help writes nothing


def test_installed_build_and_pretrain_use_the_shipped_files(installed, tmp_path):
    """The default config and genome come from the installation; the dataset and the run land
    in the working directory."""
    lam = run_installed(installed, tmp_path, sys.executable, "-c",
                        "from cmgems import bundled; print(bundled.path('data/lambda_phage.fa.gz'))")
    genome = Path(lam.stdout.strip())
    assert genome.is_file() and str(genome).startswith(str(installed / "site"))
    run_installed(installed, tmp_path, "cmgems", "build", str(genome), "data/lambda",
                  "--min-count", "5", "--valid-fraction", "0.1")
    assert (tmp_path / "data" / "lambda" / "manifest.json").is_file()
    res = run_installed(installed, tmp_path, "cmgems", "pretrain", "--data-dir", "data/lambda",
                        "--max-steps", "2", "--max-length", "64", "--micro-batch-size", "2",
                        "--eval-interval", "2", "--eval-batches", "1", "--num-workers", "0",
                        "--output-dir", "runs/x", "--no-log-model", "--no-system-metrics",
                        timeout=600)
    assert (tmp_path / "runs" / "x" / "export" / "config.json").is_file(), res.stderr[-2000:]
    assert (tmp_path / "runs" / "mlflow.db").is_file()
