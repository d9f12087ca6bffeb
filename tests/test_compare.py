"""The strategy comparison: task/strategy parsing, and one real end-to-end comparison (two DeepSpeed
pretraining subprocesses on CPU, few-shot finetuning, a SQLite MLflow store) re-run to check that
finished runs are skipped."""
from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import matplotlib.image
import pytest

from conftest import ROOT, run_module
from cmgems.compare import (FewshotTask, config_mismatch, finished_result, parse_fewshot,
                            parse_strategies)
from cmgems.errors import InputError

COMPARE = str(ROOT / "launchers" / "compare.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_PRETRAIN = ("--max-length 128 --micro-batch-size 4 --grad-accum 1 --eval-interval 2 "
                 "--eval-batches 2 --threshold 1e9 --warmup-steps 2 --num-workers 1 "
                 "--log-interval 1 --save-interval 6")


@pytest.fixture(scope="module")
def test60(tmp_path_factory, prom_core) -> Path:
    """60 rows of the prom-core-shaped test file (30 per class): each finetuning is quick."""
    lines = (prom_core / "test.tsv").read_text().splitlines()
    by_label = {lab: [r for r in lines[1:] if r.rstrip().endswith(lab)] for lab in ("0", "1")}
    rng = random.Random(0)
    rows = rng.sample(by_label["0"], 30) + rng.sample(by_label["1"], 30)
    path = tmp_path_factory.mktemp("fewshot") / "test60.tsv"
    path.write_text("\n".join([lines[0], *rows]) + "\n")
    return path


# ---------------------------------------------------------------------- parsing, in process
def test_fewshot_specs(tmp_path, prom_core, test60):
    train = prom_core / "10" / "train.tsv"
    t = parse_fewshot(f"prom={train}:{test60}")
    assert (t.name, t.train, t.test) == ("prom", train, test60)
    folder = parse_fewshot(str(prom_core / "10"))  # GeneMask layout: test.tsv one level up
    assert (folder.name, folder.train, folder.test) == ("prom-core/10", train,
                                                   prom_core / "test.tsv")
    assert parse_fewshot(f"{train}:{test60}").name == "10/train"
    with pytest.raises(InputError, match="missing.tsv does not exist"):
        parse_fewshot(f"x={train}:{tmp_path / 'missing.tsv'}")
    with pytest.raises(InputError, match="expected NAME=TRAIN:TEST"):
        parse_fewshot(f"x={train}")
    with pytest.raises(InputError, match="needs train.tsv"):
        parse_fewshot(str(tmp_path))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="must end in .tsv or .csv"):
        FewshotTask("x", tmp_path / "a.txt", test60)


def test_strategy_lists():
    assert parse_strategies("cm_gems, random") == ["cm_gems", "random"]
    with pytest.raises(InputError, match="unknown strategy 'bert'"):
        parse_strategies("random,bert")
    with pytest.raises(InputError, match="twice"):
        parse_strategies("random,random")


def test_finished_and_mismatched_runs(tmp_path):
    run = tmp_path / "random"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"mode": "fixed:random", "max_steps": 6}))
    (run / "result.json").write_text(json.dumps({"step": 3, "stopped_by": "SIGUSR1"}))
    assert finished_result(run) is None  # interrupted: to be resumed, not skipped
    (run / "result.json").write_text(json.dumps({"step": 6, "stopped_by": None}))
    assert finished_result(run)["step"] == 6
    assert config_mismatch(run, {"mode": "fixed:random", "max_steps": 6}) is None
    assert "max_steps is 6 there, 8 requested" in config_mismatch(run, {"max_steps": 8})


@pytest.mark.slow
def test_cli_refuses_bad_input_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    res = run_module(COMPARE, "--output-dir", str(out), "--", "--output-dir", "x", check=False)
    assert res.returncode == 2 and "--output-dir cannot be passed through" in res.stderr
    res = run_module(COMPARE, "--output-dir", str(out), "--fewshot", "t=/nonexistent.tsv:b.tsv",
                     check=False)
    assert res.returncode == 2 and "/nonexistent.tsv does not exist" in res.stderr
    assert not out.exists()  # nothing written for a refused command line


def test_help_explains_every_option():
    out = run_module(COMPARE, "--help").stdout
    for opt in ("--strategies", "--output-dir", "--data-dir", "--max-steps", "--model", "--seed",
                "--num-gpus", "--pretrain-args", "--fewshot", "--runs", "--shots",
                "--finetune-epochs", "--experiment"):
        assert opt in out


# ---------------------------------------------------------------------- end to end
def store_rows(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


@pytest.mark.slow
def test_failed_pretraining_names_strategy_and_log(tiny_dataset, tmp_path):
    out = tmp_path / "cmp"
    res = run_module(COMPARE, "--output-dir", str(out), "--strategies", "random",
                     "--data-dir", str(tiny_dataset), "--pretrain-args", "--lr -1", check=False)
    log = out / "logs" / "random.log"
    assert res.returncode == 2, res.stderr[-2000:]  # pretraining's own input error, passed on
    assert f"pretraining of strategy 'random' failed (exit 2); full log: {log}" in res.stderr
    assert "lr must be > 0" in log.read_text()
    status = store_rows(out / "mlflow.db", "SELECT status FROM runs")
    assert status == [("FAILED",)]  # the parent run; no child was ever created
    assert not (out / "comparison.md").exists()


@pytest.mark.slow
def test_compare_two_strategies_end_to_end_and_rerun(tiny_dataset, prom_core, test60, tmp_path):
    out = tmp_path / "cmp"
    args = [COMPARE, "--output-dir", str(out), "--strategies", "random,cm_gems",
            "--data-dir", str(tiny_dataset), "--max-steps", "6", "--num-gpus", "0",
            "--fewshot", f"prom10={prom_core / '10' / 'train.tsv'}:{test60}", "--runs", "1",
            "--finetune-epochs", "2", "--pretrain-args", TINY_PRETRAIN]
    first = run_module(*args, timeout=900)
    assert "skipping" not in first.stdout

    # The table: one row per strategy, columns for perplexity, switch step and the task.
    md = (out / "comparison.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| strategy | mode"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "strategy", "mode", "final ppl_ref", "switch step", "prom10 acc %"]
    body = md[md.index(header) + 2:]
    body = body[:body.index("")]  # the first table ends at a blank line
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in body}
    assert set(rows) == {"random", "cm_gems"}
    results = {s: json.loads((out / s / "result.json").read_text()) for s in rows}
    for s, cells in rows.items():
        assert cells[1] == {"random": "fixed:random", "cm_gems": "cm_gems"}[s]
        ref = results[s]["history"][-1]
        assert cells[2] == f"{ref['ppl_ref']:.3f} (step 6)"
        acc = json.loads((out / s / "fewshot" / "prom10.json").read_text())["mean"]["accuracy"]
        assert cells[4].startswith(f"{100 * acc:.2f} ± ")
    assert rows["cm_gems"][3] == "4"  # threshold 1e9: switch at the second evaluation
    assert rows["random"][3] == "—"
    # The same seed and data order: the two runs differ only in masking, so their very first
    # evaluation (after 2 steps) is close but not identical.
    assert results["random"]["history"][0]["step"] == results["cm_gems"]["history"][0]["step"] == 2

    for png in ("ref_perplexity.png", "fewshot_accuracy.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200

    # MLflow: one parent, a child per strategy (the pretraining run) carrying its few-shot metrics.
    db = out / "mlflow.db"
    runs = dict(store_rows(db, "SELECT name, run_uuid FROM runs"))
    assert set(runs) == {"cmp", "cmp-random", "cmp-cm_gems"}
    parent = runs["cmp"]
    children = store_rows(db, "SELECT run_uuid FROM tags WHERE key='mlflow.parentRunId' AND value=?",
                          parent)
    assert {c for (c,) in children} == {runs["cmp-random"], runs["cmp-cm_gems"]}
    for s in ("random", "cm_gems"):
        assert results[s]["mlflow_run_id"] == runs[f"cmp-{s}"]
        (acc,) = store_rows(db, "SELECT value FROM latest_metrics WHERE run_uuid=? AND "
                                "key='fewshot/prom10/accuracy_mean'", runs[f"cmp-{s}"])
        assert acc[0] == pytest.approx(json.loads(
            (out / s / "fewshot" / "prom10.json").read_text())["mean"]["accuracy"])
        assert store_rows(db, "SELECT key FROM latest_metrics WHERE run_uuid=? AND key=?",
                          runs[f"cmp-{s}"], "eval/ppl_ref")  # the trainer's own metrics
    assert store_rows(db, "SELECT status FROM runs WHERE run_uuid=?", parent) == [("FINISHED",)]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    assert {a.path for a in client.list_artifacts(parent)} >= {
        "comparison.md", "comparison.json", "ref_perplexity.png", "fewshot_accuracy.png"}

    # Re-run: both pretrainings and few-shot results are reused, nothing new in the store.
    stamps = {s: (out / s / "result.json").stat().st_mtime_ns for s in rows}
    second = run_module(*args, timeout=300)
    for s in ("random", "cm_gems"):
        assert f"{s}: finished run found in {out / s} (step 6), skipping its pretraining" \
            in second.stdout
        assert (out / s / "result.json").stat().st_mtime_ns == stamps[s]
    assert f"parent run {parent} (reused)" in second.stdout
    assert dict(store_rows(db, "SELECT name, run_uuid FROM runs")) == runs
    assert (out / "comparison.md").read_text().splitlines() == md

    # A finished run is never reused for a different step budget.
    res = run_module(*[a if a != "6" else "8" for a in args], check=False)
    assert res.returncode == 2
    assert f"{out / 'random'}: holds a finished run with other settings (max_steps is 6 there, " \
        "8 requested)" in res.stderr
