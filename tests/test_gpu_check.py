"""benchmarks/gpu_check.sh without a GPU: it parses, it skips cleanly without CUDA, and its
tiny mode runs every step's Python code on the CPU (real Trainer, real loader, real pytest run)
and builds the one table; a failing step is a FAILED row and exit 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_module

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GPU_TRAIN = str(ROOT / "benchmarks" / "gpu_train.py")


def run_check(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_its_attention_paths_are_the_configs():
    """gpu_train.py keeps torch out of its table commands, so it spells the packed attention
    paths itself: they must be the pretraining config's."""
    import importlib.util

    from cmgems.data.packing import PACKED_ATTENTION
    spec = importlib.util.spec_from_file_location("gpu_train", GPU_TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PACKED_ATTENTION == PACKED_ATTENTION


def test_the_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_skips_and_exits_0(tmp_path):
    table = tmp_path / "table.md"
    res = run_check(table)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("no CUDA: skipped")
    assert not table.exists()


@pytest.mark.slow
def test_pytest_row_counts_and_table(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" '
                     'skipped="1"></testsuite></testsuites>')
    run_module(GPU_TRAIN, "pytest-row", str(junit), "--check", "masking", "--json",
               str(tmp_path / "a.json"))
    row = json.loads((tmp_path / "a.json").read_text())[0]
    assert row["status"] == "FAILED" and row["note"] == "3 passed, 1 failed, 1 skipped"
    run_module(GPU_TRAIN, "pytest-row", str(tmp_path / "missing.xml"), "--check", "masking",
               "--json", str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text())[0]["status"] == "FAILED"
    res = run_module(GPU_TRAIN, "table", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                     "--out", str(tmp_path / "t.md"), "--device", "test device")
    text = (tmp_path / "t.md").read_text()
    assert text == res.stdout.rstrip("\n") + "\n"
    assert text.startswith("GPU check on test device") and text.count("| masking |") == 2


@pytest.mark.slow
def test_tiny_mode_runs_every_step_and_writes_the_table(tiny_dataset, tmp_path):
    res = run_check(GPU_CHECK_TINY="1", GPU_CHECK_DATA=str(tiny_dataset), OUT=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (tmp_path / "gpu_check.md").read_text()
    assert text in res.stdout
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    checks = {r[0].lstrip("| ") for r in rows}
    assert checks == {"CUDA masking identity", "CUDA packed attention", "training", "loader",
                      "cm_gems run"}, text
    assert "FAILED" not in text
    train = [r for r in rows if r[0] == "| training" and r[2] == "ok"]
    # packed under each path: SDPA runs on the CPU, the variable-length kernels are skipped rows
    assert [r[2] for r in rows if "(torch_varlen attention)" in r[1]] == ["skipped"]
    assert any("compiled" in r[1] and r[2] == "ok" for r in rows), text
    assert train and float(train[0][3].replace(",", "")) > 0   # real tokens/s
    assert "switched genemask -> global at step [4], export loads: True" in text
    loader = [r for r in rows if r[0] == "| loader" and r[1].startswith("TrainBatches, 2")]
    assert loader and "x the per-sample loader" in loader[0][7]


@pytest.mark.slow
def test_a_failing_step_is_a_failed_row_and_exit_1(tmp_path):
    """Every check fails (a PYTHON that exits 3 for them, and runs the table-making commands):
    each is a FAILED row with its exit status, the later checks still run, the exit is 1."""
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case "$1 $2" in
  "benchmarks/gpu_train.py row"|"benchmarks/gpu_train.py pytest-row"|\\
  "benchmarks/gpu_train.py table"|"benchmarks/gpu_train.py loader-rows") ;;
  *) exit 3 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    table = tmp_path / "t.md"
    res = run_check(table, GPU_CHECK_TINY="1", PYTHON=str(python))
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    text = table.read_text()
    checks = ["CUDA masking identity", "CUDA packed attention",
              *(f"training logo packing={p} attention={a}" for p, a in
                (("off", "auto"), ("on", "sdpa"), ("on", "torch_varlen"), ("on", "flash_attn"),
                 ("on", "auto compile"))), "loader", "cm_gems run"]
    for check in checks:
        assert f"| {check} | - | FAILED | exit 3 |" in text.replace(" | - | - | - | - | ", " | "), text
    assert text.count("exit 3") == len(checks), text  # one row each
