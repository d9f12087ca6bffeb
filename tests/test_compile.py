"""compile: torch.compile of the model through DeepSpeed's engine.compile(). The option is
declared, validated and documented in --help; a short run compiled gives the eager run's losses
and compiles its graphs once (perf/compiled_graphs does not grow with the steps)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT, run_module
from mlflow.tracking import MlflowClient

from cmgems.errors import InputError
from cmgems.pretrain.config import PretrainConfig

PRETRAIN = str(ROOT / "launchers" / "pretrain.py")


def test_compile_is_declared_validated_and_in_help():
    assert PretrainConfig().compile is False
    with pytest.raises(InputError, match="compile must be true or false"):
        PretrainConfig(compile="yes")
    out = run_module(PRETRAIN, "--help").stdout
    assert "--compile, --no-compile" in out
    text = " ".join(out[out.index("--compile, --no-compile"):].split())
    assert "torch.compile the model" in text and "(default: False)" in text


@pytest.mark.slow
def test_compiled_run_gives_the_eager_losses_and_compiles_once(tiny_dataset, tmp_path):
    """LOGO (no dropout) for 8 packed steps, eager and compiled: train/loss agrees at every
    step, and the compiled run's graph count is the same after step 1 as after step 8 (batch
    shapes vary from step to step: rows, width, selected positions)."""
    history = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag.strip("-")
        run_module(PRETRAIN, "--data-dir", str(tiny_dataset), "--output-dir", str(out),
                   "--max-steps", "8", "--micro-batch-size", "6", "--max-length", "64",
                   "--eval-interval", "100", "--eval-batches", "1", "--log-interval", "1",
                   "--save-interval", "100", "--num-workers", "0", "--mode", "fixed:genemask",
                   "--warmup-steps", "2", "--no-system-metrics", "--no-log-model", flag)
        run_id = json.loads((out / "result.json").read_text())["mlflow_run_id"]
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        history[flag] = {key: [m.value for m in sorted(client.get_metric_history(run_id, key),
                                                       key=lambda m: m.step)]
                         for key in ("train/loss", "perf/compiled_graphs",
                                     "perf/attention_token_share")}
    eager, compiled = history["--no-compile"], history["--compile"]
    assert len(eager["train/loss"]) == len(compiled["train/loss"]) == 8
    assert np.allclose(compiled["train/loss"], eager["train/loss"], rtol=1e-4, atol=0)
    assert eager["perf/compiled_graphs"] == []
    graphs = compiled["perf/compiled_graphs"]
    assert len(graphs) == 8 and graphs[0] >= 1 and graphs == [graphs[0]] * 8, graphs
    assert len(set(compiled["perf/attention_token_share"])) > 1  # the shapes did change
