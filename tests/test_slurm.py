"""launchers/slurm/pretrain.sbatch on a real Slurm brought up on this host (two simulated nodes):
a one-node two-task job, a two-node job, and a time-limit warning that checkpoints, requeues and
resumes the same MLflow run."""
from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import pytest

from launch_checks import ROOT, check_two_rank_run, clean_env, mlflow_runs, remove_shm_buffers, \
    trainer_args
from slurm_cluster import SlurmCluster

SBATCH = ROOT / "launchers" / "slurm" / "pretrain.sbatch"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def shm_cleanup(tmp_path):
    """Remove DeepSpeed's /dev/shm buffers of this test's jobs, should a job script not have."""
    yield
    for log in tmp_path.glob("job-*.out"):
        for port in set(re.findall(r"master=[^ :]+:(\d+)", log.read_text(errors="replace"))):
            remove_shm_buffers(port)


def submit(cluster: SlurmCluster, tmp_path: Path, sbatch_args: list[str], trainer: list[str]) -> int:
    env = clean_env()
    env.update(SLURM_CONF=str(cluster.conf), CMGEMS_PYTHON=sys.executable)
    env.pop("CMGEMS_ROOT", None)  # the script finds the checkout from its own submitted path
    return cluster.sbatch(f"--output={tmp_path / 'job-%j.out'}", *sbatch_args, str(SBATCH),
                          *trainer, env=env, cwd=tmp_path)


def job_log(tmp_path: Path, job_id: int) -> str:
    f = tmp_path / f"job-{job_id}.out"
    return f.read_text(errors="replace") if f.exists() else ""


def finish(cluster: SlurmCluster, tmp_path: Path, job_id: int, timeout: float = 300) -> str:
    rec = cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                      "OUT_OF_MEMORY"}, timeout)
    log = job_log(tmp_path, job_id)
    assert rec["JobState"] == "COMPLETED", f"{rec}\n{log[-6000:]}\n{cluster.logs(8000)}"
    return log


def ranks_placed(log: str) -> dict[str, str]:
    """rank -> node, from the line rank_env.sh prints for every task."""
    placed = {}
    for line in log.splitlines():
        if line.startswith("[rank_env] "):
            fields = dict(f.split("=", 1) for f in line.split()[1:])
            placed[fields["rank"]] = fields["node"]
    return placed


def test_one_node_two_tasks(cluster, tiny_dataset, tmp_path):
    out = tmp_path / "one" / "run"
    job = submit(cluster, tmp_path, ["--nodes=1", "--ntasks=2"], trainer_args(tiny_dataset, out))
    log = finish(cluster, tmp_path, job)
    placed = ranks_placed(log)
    assert set(placed) == {"0/2", "1/2"} and len(set(placed.values())) == 1, log[-3000:]
    assert "master=127.0.0.1:" in log  # NodeAddr, not the node name (which does not resolve)
    check_two_rank_run(out, max_steps=4)
    # The job script removed the shared-memory buffers of its own rendezvous.
    port = log.split("master=127.0.0.1:")[1].split()[0]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_two_nodes_one_task_each(cluster, tiny_dataset, tmp_path):
    out = tmp_path / "two" / "run"
    job = submit(cluster, tmp_path, ["--nodes=2", "--ntasks-per-node=1"],
                 trainer_args(tiny_dataset, out))
    log = finish(cluster, tmp_path, job)
    assert ranks_placed(log) == {"0/2": "n1", "1/2": "n2"}, log[-3000:]
    check_two_rank_run(out, max_steps=4)


def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, tiny_dataset, tmp_path):
    max_steps = 20
    out = tmp_path / "requeue" / "run"
    job = submit(cluster, tmp_path, ["--nodes=1", "--ntasks=2"],
                 trainer_args(tiny_dataset, out, max_steps=max_steps, save_interval=2))
    pointer = out / "checkpoints" / "latest_complete"
    deadline = time.monotonic() + 240
    while not pointer.exists():
        assert time.monotonic() < deadline, f"no checkpoint yet\n{job_log(tmp_path, job)[-4000:]}"
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), job_log(tmp_path, job)
        time.sleep(0.1)
    # What Slurm does at --signal=B:USR1@<s> before the time limit: USR1 to the batch shell only.
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    deadline = time.monotonic() + 120
    while cluster.job(job).get("Restarts") != "1":
        assert time.monotonic() < deadline, f"not requeued\n{job_log(tmp_path, job)[-4000:]}"
        time.sleep(0.25)
    requeued_by = time.time()
    # Slurm holds a requeued job back for a couple of minutes (its BeginTime); release it sooner,
    # but only once the first instance has left its node (started on a node still completing it,
    # the second instance fails to launch) and the clock has moved on a whole second: the requeue
    # revoked the job's credential at a time in whole seconds, and a credential issued in that same
    # second counts as revoked ("Job 1 already killed, do not launch batch job"; the job FAILED,
    # RunTime 00:00:00). Slurm's own delay keeps real requeues clear of both.
    deadline = time.monotonic() + 120
    while any(state != "idle" for state in
              cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()):
        assert time.monotonic() < deadline, "nodes still busy after the requeue"
        time.sleep(0.25)
    time.sleep(max(0.0, math.floor(requeued_by) + 2 - time.time()))
    if cluster.job(job).get("JobState") == "PENDING":
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    log = finish(cluster, tmp_path, job)

    assert "USR1: asking the training step to checkpoint" in log and "requeueing" in log, log[-4000:]
    assert "restart 1] training step exited with status 0" in log, log[-4000:]
    run = check_two_rank_run(out, max_steps=max_steps)
    # The first run stopped on the signal (after the step-2 checkpoint, before max_steps) and the
    # requeued one continued from that checkpoint in the same MLflow run.
    resumed_at = int(run.data.tags["resumed_at_step"])
    assert 2 < resumed_at < max_steps, resumed_at
    runs, _ = mlflow_runs(out.parent / "mlflow.db")
    assert [r.info.run_id for r in runs] == [run.info.run_id]


def test_preprocess_job_builds_a_verified_dataset(cluster, lambda_fasta, tmp_path):
    from cmgems.data.shards import Manifest, ShardSet, verify

    out = tmp_path / "lambda"
    env = clean_env()
    env.update(SLURM_CONF=str(cluster.conf), CMGEMS_PYTHON=sys.executable)
    job = cluster.sbatch(f"--output={tmp_path / 'job-%j.out'}", "--cpus-per-task=2",
                         str(ROOT / "launchers" / "slurm" / "preprocess.sbatch"), str(lambda_fasta),
                         "lambda", "--min-count", "5", "--valid-fraction", "0.1",
                         "--shard-tokens", "20000", env=env, cwd=tmp_path)
    log = finish(cluster, tmp_path, job)
    assert "workers=2" in log, log
    manifest = Manifest.load(out)  # relative OUT_DIR: taken from the submit directory
    verify(out, manifest)
    assert len(ShardSet(out, "train", manifest)) > 0 and len(ShardSet(out, "valid", manifest)) > 0
