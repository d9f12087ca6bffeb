"""MLflow runs of an evaluation (cmgems.evaluation.finetune): one parent run per task, one child per seed.

The parent names the pretraining run of its model (tag `cmgems.pretrain_run_id`, from the export's
cmgems.json) and receives the result JSON and the test predictions as artifacts. Everything goes
through cmgems.tracking.tracker.Tracker, so a store that fails never stops an evaluation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.tracking.tracker import Tracker

log = logging.getLogger("cmgems.finetune")

PRETRAIN_RUN_TAG = "cmgems.pretrain_run_id"


@dataclass
class Tracking:
    """Where results go in MLflow: one parent run per task, one child run per seed."""

    uri: str  # tracking URI, e.g. cmgems.tracking.uri.resolve_tracking_uri(runs_root)
    experiment: str = "cmgems-eval"  # experiment name, created when missing


def _flat(prefix: str, metrics: dict | None) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in (metrics or {}).items()}


def _finite(values: dict) -> dict[str, float]:
    """What MLflow is sent: a metric that does not exist (no dev set) or is not finite is left
    out."""
    return {k: v for k, v in values.items() if v is not None and np.isfinite(v)}


def start_task_run(tracking: Tracking | None, name: str, params: dict, info) -> Tracker:
    """The task's MLflow run, linked to its model's pretraining run. If it cannot be created,
    tracking is off for the whole task (its seeds' runs would have no parent); the results still
    come back and go to the JSON file."""
    if tracking is None:
        return Tracker(False)
    parent = Tracker(True, tracking.uri, tracking.experiment, name)
    if parent.run_id is None:
        log.warning("MLflow tracking disabled after an error: the run of %s could not be "
                    "created in %s", name, tracking.uri)
        return Tracker(False)
    parent.log_params(params)
    parent.set_tag("cmgems.model_dir", str(Path(info.path).resolve()))
    if info.pretrain_run_id:
        parent.set_tag(PRETRAIN_RUN_TAG, info.pretrain_run_id)
    for key in ("run_name", "mode", "step"):
        if key in info.meta:
            parent.set_tag(f"cmgems.pretrain_{key}", info.meta[key])
    return parent


def log_run(parent: Tracker, name: str, res: dict, train_rows: int) -> None:
    """One seed's child run: its parameters and test / dev metrics."""
    child = parent.child(f"{name}/seed{res['seed']}")
    child.log_params({"seed": res["seed"], "run": res["run"], "train_rows": train_rows or "all",
                      "precision": res["precision"]})
    child.log_metrics(_finite({**_flat("test_", res["metrics"]), "test_loss": res["test_loss"],
                               **_flat("dev_", res["dev_metrics"]),
                               "train_loss": res["train_loss"], "steps": res["steps"]}), 0)
    child.finish()


def finish_task_run(parent: Tracker, status: str, result_json: Path | None = None,
                    predictions: Path | None = None, summary: dict | None = None) -> None:
    if summary:
        parent.log_metrics(_finite({**_flat("test_mean_", summary["mean"]),
                                    **_flat("test_std_", summary["std"])}), 0)
    for path in (result_json, predictions):
        if path is not None:
            parent.log_artifact(path)
    parent.finish(status)
