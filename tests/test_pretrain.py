"""Pretraining end to end: the real DeepSpeed engine on CPU (gloo), a real SQLite MLflow store,
real subprocess launches of launchers/pretrain.py."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import ROOT, run_module
from cmgems.pretrain import config as config_mod
from cmgems import options
from cmgems.data.loader import ShardedSampler, collate
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID

PRETRAIN = str(ROOT / "launchers" / "pretrain.py")


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A few steps of LOGO on 128-token blocks; threshold 1e9 forces the cm_gems switch at the
    second evaluation (step 4), so the switch is exercised deterministically."""
    return [PRETRAIN, "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "8",
            "--micro-batch-size", "4", "--grad-accum", "1", "--max-length", "128",
            "--eval-interval", "2", "--eval-batches", "2", "--log-interval", "1",
            "--save-interval", "4", "--num-workers", "1", "--threshold", "1e9",
            "--warmup-steps", "2", *extra]


def result_of(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def store_of(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out.parent.resolve() / 'mlflow.db'}")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "export" / "model.safetensors")


# ---------------------------------------------------------------------- in-process units
def test_sampler_is_disjoint_and_resumable():
    n, world = 103, 3
    parts = [ShardedSampler(n, r, world, seed=5) for r in range(world)]
    for s in parts:
        s.set_position(epoch=2)
    idx = [set(s.indices().tolist()) for s in parts]
    assert all(len(i) == n // world for i in idx)
    assert not (idx[0] & idx[1]) and not (idx[1] & idx[2]) and not (idx[0] & idx[2])
    s = parts[1]
    full = list(iter(s))
    s.set_position(epoch=2, start=7)
    assert list(iter(s)) == full[7:]
    s.set_position(epoch=3)
    assert list(iter(s)) != full  # reshuffled every epoch


def test_collate_layout():
    import numpy as np
    b = collate([(np.array([10, 11, 12], np.uint16), np.array([0.1, 0.2, 0.3], np.float16)),
                 (np.array([20], np.uint16), np.array([np.nan], np.float16))])
    assert b["input_ids"].tolist() == [[CLS_ID, 10, 11, 12, SEP_ID], [CLS_ID, 20, SEP_ID, PAD_ID, PAD_ID]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert torch.isnan(b["npmi"][:, 0]).all() and torch.isnan(b["npmi"][0, 4])
    assert abs(b["npmi"][0, 2].item() - 0.2) < 1e-3


def test_config_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 10\nmax_stepz: 3\n")
    with pytest.raises(config_mod.InputError, match=r"bad\.yaml.*max_stepz"):
        options.load_file(bad, config_mod.PretrainConfig)
    bad.write_text("max_steps: ten\n")
    with pytest.raises(config_mod.InputError, match=r"bad\.yaml.*'max_steps' must be int"):
        options.load_file(bad, config_mod.PretrainConfig)
    with pytest.raises(config_mod.InputError, match="zero_stage"):
        config_mod.PretrainConfig(zero_stage=5)


# ---------------------------------------------------------------------- subprocess runs
@pytest.mark.slow
def test_help_documents_every_field():
    res = run_module(PRETRAIN, "--help")
    text = " ".join(res.stdout.split())
    for name in options.field_types(config_mod.PretrainConfig):
        assert "--" + name.replace("_", "-") in text, name
    assert "--resume" in text and "--config" in text


@pytest.fixture(scope="module")
def stage0_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "zero0"
    res = run_module(*tiny_args(tiny_dataset, out, "--zero-stage", "0", "--export-interval", "4"))
    (out.parent / "zero0.stderr").write_text(res.stderr)
    return out


@pytest.mark.slow
def test_run_logs_switch_exports_and_plots(stage0_run):
    out = stage0_run
    res = result_of(out)
    assert res["step"] == 8 and res["stage"] == "global" and res["stopped_by"] is None
    assert [e["step"] for e in res["events"]] == [4]
    client = store_of(out)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["curriculum.switch_step"] == "4"
    assert run.data.params["config.mode"] == "cm_gems" and run.data.params["world_size"] == "1"
    stage = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "curriculum/stage")}
    assert stage[2] == 0 and stage[4] == 1 and stage[8] == 1
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))
    for key in ("eval/ppl", "eval/ppl_ref", "mask/selected_fraction", "perf/samples_per_s",
                "train/lr", "train/grad_norm"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "ds_config.json", "npmi.tsv", "perplexity.png", "masks.png",
            "curriculum_events.json"} <= artifacts
    assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG"
    events = json.loads((out / "curriculum_events.json").read_text())
    assert events[0]["from"] == "genemask" and events[0]["to"] == "global"
    assert res["switch_step"] == 4
    # the progress line written right after the switch names the new stage
    lines = (out.parent / "zero0.stderr").read_text().splitlines()
    stage_at = {int(m.group(1)): m.group(2) for m in
                (re.search(r": (\d)/8 steps .* stage=(\w+)", ln) for ln in lines) if m}
    assert stage_at[3] == "genemask" and stage_at[4] == "global", lines


@pytest.mark.slow
def test_final_perplexity_under_each_frozen_masking(stage0_run):
    """result.json's final_ppl (the comparison's 3 x 5 matrix reads it) and final/ppl_* metrics;
    the frozen masking of the run's own evaluations gives the same number at the last step."""
    import math
    res = result_of(stage0_run)
    final = res["final_ppl"]
    assert set(final) == {"random", "genemask", "global"}
    assert all(math.isfinite(v) and v > 1 for v in final.values()), final
    assert len(set(final.values())) == 3   # three maskings, three numbers
    assert final["random"] == pytest.approx(res["history"][-1]["ppl_ref"], rel=1e-12)
    assert final["genemask"] == pytest.approx(res["history"][-1]["ppl"], rel=1e-12)
    client = store_of(stage0_run)
    for strategy, value in final.items():
        hist = client.get_metric_history(res["mlflow_run_id"], f"final/ppl_{strategy}")
        assert [(m.step, m.value) for m in hist] == [(8, pytest.approx(value))]


@pytest.mark.slow
def test_export_interval_keeps_step_exports(stage0_run):
    from transformers import AutoModelForMaskedLM
    exports = stage0_run / "export"
    assert sorted(p.name for p in exports.iterdir() if p.is_dir()) == ["step-4", "step-8"]
    for step in (4, 8):
        assert json.loads((exports / f"step-{step}" / "cmgems.json").read_text())["step"] == step
    assert AutoModelForMaskedLM.from_pretrained(exports / "step-4").config.vocab_size == 4101
    final, at8 = weights(stage0_run), load_file(exports / "step-8" / "model.safetensors")
    assert all(torch.equal(final[k], at8[k]) for k in final)
    at4 = load_file(exports / "step-4" / "model.safetensors")
    assert not all(torch.equal(final[k], at4[k]) for k in final)
    assert not list(exports.glob(".tmp-*")) and not list(exports.glob(".old-*"))


@pytest.mark.slow
def test_export_loads_with_transformers(stage0_run):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
    export = stage0_run / "export"
    mlm = AutoModelForMaskedLM.from_pretrained(export)
    clf = AutoModelForSequenceClassification.from_pretrained(export, num_labels=2)
    assert mlm.config.vocab_size == 4101 and clf.config.num_hidden_layers == 2
    vocab = (export / "vocab.txt").read_text().split()
    assert vocab[:6] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "AAAAAA"]
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight,
                       weights(stage0_run)["bert.embeddings.word_embeddings.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_stage0(stage, tiny_dataset, stage0_run, tmp_path):
    out = tmp_path / f"zero{stage}"
    run_module(*tiny_args(tiny_dataset, out, "--zero-stage", str(stage)))
    assert result_of(out)["step"] == 8
    ref, got = weights(stage0_run), weights(out)
    assert ref.keys() == got.keys()
    # Same data, masks and fp32 math; ZeRO only changes where states live and the order of
    # reductions, which moves weights by float rounding (~1e-7) after 8 AdamW steps.
    diff = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
    worst = max(diff, key=diff.get)
    assert diff[worst] < 1e-4, f"{worst} differs by {diff[worst]:.3g}"
    assert (out / "checkpoints" / "step_00000008").is_dir()


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_dataset, stage0_run, tmp_path):
    """Resume from the step-4 checkpoint of the uninterrupted run: data position, masks, optimizer,
    LR schedule and curriculum stage all carry over, so step 8 matches bit for bit."""
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(stage0_run / "checkpoints" / "step_00000004",
                    out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest_complete").write_text("step_00000004\n")
    # the resumed run logs into the original run, in the store next to the original run dir
    shutil.copy(stage0_run.parent / "mlflow.db", tmp_path / "mlflow.db")
    run_module(*tiny_args(tiny_dataset, out, "--zero-stage", "0", "--resume"))
    res, ref = result_of(out), result_of(stage0_run)
    assert res["mlflow_run_id"] == ref["mlflow_run_id"] and res["stage"] == "global"
    a, b = weights(stage0_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    client = store_of(out)
    steps = [m.step for m in client.get_metric_history(res["mlflow_run_id"], "train/loss")]
    assert sorted(steps) == list(range(1, 9))  # nothing logged twice
    assert client.get_run(res["mlflow_run_id"]).data.tags["resumed_at_step"] == "4"


@pytest.mark.slow
def test_existing_run_needs_resume(stage0_run, tiny_dataset):
    res = run_module(*tiny_args(tiny_dataset, stage0_run), check=False)
    assert res.returncode == 2
    assert "--resume" in res.stderr and str(stage0_run) in res.stderr
    res = run_module(*tiny_args(tiny_dataset, stage0_run, "--resume", "--seed", "7"), check=False)
    assert res.returncode == 2
    assert "another config" in res.stderr and "seed: 42 -> 7" in res.stderr


@pytest.mark.slow
def test_two_ranks_switch_at_same_step(tiny_dataset, tmp_path):
    out = tmp_path / "two"
    port = 29500 + os.getpid() % 1000
    res = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                          "--master_port", str(port), *tiny_args(tiny_dataset, out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    switches = [line for line in (res.stdout + res.stderr).splitlines()
                if "curriculum: genemask -> global at step" in line]
    assert len(switches) == 2 and all("at step 4 " in s for s in switches)  # one line per rank
    client = store_of(out)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # rank 0 alone logs
    assert runs[0].data.tags["curriculum.switch_step"] == "4"
    assert runs[0].data.params["world_size"] == "2"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_cleanly(tiny_dataset, tmp_path):
    out = tmp_path / "sig"
    args = tiny_args(tiny_dataset, out, "--zero-stage", "0")
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000004").is_dir() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    res = result_of(out)
    assert res["stopped_by"] == "SIGUSR1" and 4 <= res["step"] < 100000
    assert (out / "checkpoints" / "latest_complete").read_text().strip() == f"step_{res['step']:08d}"
    run = store_of(out).get_run(res["mlflow_run_id"])
    assert run.info.status == "KILLED"
