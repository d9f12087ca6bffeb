"""Two ranks on localhost through the deepspeed launcher and torchrun, and the per-task rank mapping
the Slurm job script relies on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_checks import PRETRAIN, ROOT, check_two_rank_run, clean_env, free_port, \
    remove_shm_buffers, trainer_args

RANK_ENV = ROOT / "launchers" / "slurm" / "rank_env.sh"
BIN = Path(sys.executable).parent


def run_rank_env(**slurm) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM")}
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="23456", **{k: str(v) for k, v in slurm.items()})
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run([str(RANK_ENV), "env"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def test_rank_env_maps_slurm_task_layout():
    # Task 4 of 5 on the third node of "2(x2),1": the node's only task.
    got = run_rank_env(SLURM_PROCID=4, SLURM_NTASKS=5, SLURM_LOCALID=0, SLURM_NODEID=2,
                       SLURM_NNODES=3, SLURM_STEP_TASKS_PER_NODE="2(x2),1", SLURM_CPUS_PER_TASK=3)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_SIZE"]) == ("4", "5", "0", "1")
    assert (got["CROSS_RANK"], got["CROSS_SIZE"], got["OMP_NUM_THREADS"]) == ("2", "3", "3")
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("10.0.0.1", "23456")
    # Task 3 on the second node: two tasks there.
    got = run_rank_env(SLURM_PROCID=3, SLURM_NTASKS=5, SLURM_LOCALID=1, SLURM_NODEID=1,
                       SLURM_STEP_TASKS_PER_NODE="2(x2),1")
    assert (got["RANK"], got["LOCAL_RANK"], got["LOCAL_SIZE"], got["OMP_NUM_THREADS"]) == \
        ("3", "1", "2", "1")


def test_rank_env_never_sets_local_size_empty():
    # Only --ntasks given: no SLURM_NTASKS_PER_NODE and no step layout; LOCAL_SIZE is still a number.
    got = run_rank_env(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_NODEID=0,
                       SLURM_TASKS_PER_NODE="2")
    assert got["LOCAL_SIZE"] == "2"


def test_rank_env_refuses_to_run_without_a_rendezvous():
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM")}
    env["SLURM_PROCID"] = "0"
    res = subprocess.run([str(RANK_ENV), "true"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "MASTER_ADDR" in res.stderr


def test_job_scripts_parse():
    for script in sorted((ROOT / "launchers" / "slurm").glob("*.sbatch")) + [RANK_ENV]:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)


def _launch(cmd: list[str], port: int, cwd: Path) -> None:
    env = clean_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's ninja: no op rebuilds
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    finally:
        remove_shm_buffers(port)
    assert res.returncode == 0, f"{cmd[0]} exited {res.returncode}\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-5000:]}"


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tiny_dataset, tmp_path):
    out = tmp_path / "ds" / "run"
    port = free_port()
    deepspeed = shutil.which("deepspeed", path=str(BIN)) or "deepspeed"
    _launch([deepspeed, "--num_gpus", "2", "--master_port", str(port), str(PRETRAIN),
             *trainer_args(tiny_dataset, out)], port, tmp_path)
    check_two_rank_run(out, max_steps=4)


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_dataset, tmp_path):
    out = tmp_path / "torchrun" / "run"
    port = free_port()
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(PRETRAIN),
             *trainer_args(tiny_dataset, out)], port, tmp_path)
    check_two_rank_run(out, max_steps=4)
