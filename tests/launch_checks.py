"""What every multi-rank launch test checks about a finished pretraining run, and its tiny config."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launchers" / "pretrain.py"


def trainer_args(data_dir: Path, out: Path, max_steps: int = 4, save_interval: int = 4) -> list[str]:
    """LOGO on a few 64-token samples with ZeRO-2: seconds per run, and ZeRO-2 gives each rank a
    checkpoint file of its own to compare against rank 0's model."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--model", "logo",
            "--mode", "cm_gems", "--max-steps", str(max_steps), "--max-length", "64",
            "--micro-batch-size", "4", "--grad-accum", "1", "--warmup-steps", "1",
            "--eval-interval", "100", "--eval-batches", "1", "--log-interval", "2",
            "--save-interval", str(save_interval), "--num-workers", "0", "--zero-stage", "2",
            "--no-verify-data"]


def clean_env() -> dict:
    """The test's environment minus anything that would steer a run elsewhere."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE",
                 "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int | str) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves 66 MB per rank in /dev/shm; the names carry
    the master port, so only this run's buffers go."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


def mlflow_runs(store: Path) -> tuple[list, "object"]:
    """(runs of every experiment in the SQLite store, the client)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments]), client


def check_two_rank_run(out: Path, max_steps: int):
    """Both ranks trained to max_steps with identical parameters, and one MLflow run recorded it.

    Under ZeRO-2 each rank owns half of the fp32 weights and writes them to its own checkpoint file;
    rank 0's exported model must equal the weights merged from both files, so rank 1's half
    arrived at rank 0 unchanged. Returns the MLflow run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    result = json.loads((out / "result.json").read_text())
    assert result["step"] == max_steps and result["stopped_by"] is None, result
    tag = (out / "checkpoints" / "latest_complete").read_text().strip()
    assert tag == f"step_{max_steps:08d}", tag
    for rank in (0, 1):
        assert (out / "checkpoints" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    exported = load_file(str(out / "export" / "model.safetensors"))
    merged = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    merged = {k.removeprefix("model."): v for k, v in merged.items()}
    assert exported and set(exported) <= set(merged), set(exported) - set(merged)
    differing = [k for k, v in exported.items() if not torch.equal(v.float(), merged[k].float())]
    assert not differing, f"rank 0's model differs from the ranks' checkpoint in {differing}"

    runs, client = mlflow_runs(out.parent / "mlflow.db")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_id == result["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == max_steps, steps
    return run
