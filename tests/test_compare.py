"""The strategy comparison: task/strategy parsing, the report's tables, and one real end-to-end
comparison (two DeepSpeed pretraining subprocesses on CPU, few-shot finetuning on files made from
the bundled genome, the SQLite MLflow store of the working directory) re-run to check that finished
runs are skipped."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from conftest import ROOT, run_module
from cmgems.compare.config import (CompareConfig, FewshotTask, PretrainRun, config_mismatch,
                                   parse_fewshot, parse_strategies, strategy_label)
from cmgems.compare.report import markdown_table, paired_stats, spread_stats
from cmgems.compare.run import check_passthrough, expected_fields, pretrain_args
from cmgems.errors import InputError
from cmgems.options import DEFAULT_SEED
from cmgems.pretrain.result import RunResult
from fewshot_files import shuffled_pool, write_fewshot_tsv

COMPARE = str(ROOT / "launchers" / "compare.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_PRETRAIN = ("--max-length 128 --micro-batch-size 4 --grad-accum 1 --eval-interval 2 "
                 "--eval-batches 2 --threshold 1e9 --warmup-steps 2 --num-workers 1 "
                 "--log-interval 1 --save-interval 6")


@pytest.fixture(scope="module")
def prom(tmp_path_factory) -> Path:
    """GeneMask's few-shot layout, made from the bundled genome: prom/10/train.tsv (one draw of
    10 per class), prom/100/train.tsv (a pool of 100 per class) and prom/test.tsv (30 per
    class, so each finetuning tests in a blink)."""
    root = tmp_path_factory.mktemp("fewshot") / "prom"
    rng = np.random.default_rng(0)
    for name, per_class in (("10/train.tsv", 10), ("100/train.tsv", 100), ("test.tsv", 30)):
        write_fewshot_tsv(root / name, shuffled_pool(rng, [per_class] * 2, length=60))
    return root


# ---------------------------------------------------------------------- parsing, in process
def test_fewshot_specs(tmp_path, prom):
    train, test60 = prom / "10" / "train.tsv", prom / "test.tsv"
    t = parse_fewshot(f"prom={train}:{test60}")
    assert (t.name, t.train, t.test) == ("prom", train, test60)
    folder = parse_fewshot(str(prom / "10"))  # GeneMask layout: test.tsv one level up
    assert (folder.name, folder.train, folder.test) == ("prom/10", train, prom / "test.tsv")
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


def test_a_strategy_can_fix_its_pmi_lookup(tmp_path):
    """global and global@position are two strategies of one comparison: the second run is
    pretrained with --pmi-lookup position, must have it to be reused, and the report's mode
    column says so."""
    assert parse_strategies("global,global@position,cm_gems@token") == [
        "global", "global@position", "cm_gems@token"]
    for bad, why in (("random@position", "reads no NPMI"), ("global@kmer", "unknown lookup"),
                     ("gems@token", "unknown strategy 'gems@token'")):
        with pytest.raises(InputError, match=why):
            parse_strategies(bad)
    config = CompareConfig(strategies="global,global@position", seeds="1,2")
    runs = config.pretrain_runs
    assert [r.label for r in runs] == ["global-seed1", "global@position-seed1", "global-seed2",
                                       "global@position-seed2"]
    plain, position = (pretrain_args(config, r, tmp_path / r.label, "pid", "n", []) for r in runs[:2])
    assert "--pmi-lookup" not in plain and plain[plain.index("--mode") + 1] == "fixed:global"
    assert position[position.index("--pmi-lookup") + 1] == "position"
    assert position[position.index("--mode") + 1] == "fixed:global"
    assert expected_fields(config, runs[1]) == {"mode": "fixed:global", "pmi_lookup": "position",
                                                "seed": 1}
    assert "pmi_lookup" not in expected_fields(config, runs[0])
    with pytest.raises(InputError, match="strategy 'global@position' sets its own"):
        check_passthrough(["--pmi-lookup", "token"], config.strategy_list)
    check_passthrough(["--pmi-lookup=position"], ["global", "cm_gems"])  # one reading for all
    assert strategy_label("cm_gems@position") == "cm_gems, pmi_lookup position"


def test_seed_lists():
    one = CompareConfig(strategies="random,cm_gems", seeds="7")
    assert one.seeds is None and one.seed == 7  # one seed: today's layout, OUTPUT_DIR/<strategy>
    assert one.pretrain_runs == [PretrainRun("random", "random", 7),
                                 PretrainRun("cm_gems", "cm_gems", 7)]
    two = CompareConfig(strategies="random,cm_gems", seeds="1, 2")
    assert [r.label for r in two.pretrain_runs] == ["random-seed1", "cm_gems-seed1",
                                                    "random-seed2", "cm_gems-seed2"]
    for bad, said in (("1,1", "twice"), ("1,x", "integers"), (",", "empty"), ("-1", ">= 0")):
        with pytest.raises(InputError, match=said):
            CompareConfig(seeds=bad)
    with pytest.raises(InputError, match="--seed and --seeds"):
        CompareConfig(seed=3, seeds="1,2")


def _summary(accs: list[float]) -> dict:
    return {"runs": [{"seed": 42 + r, "metrics": {"accuracy": a, "f1": a, "mcc": 2 * a - 1}}
                     for r, a in enumerate(accs)]}


def test_paired_statistics_pair_seed_and_draw_and_spread_sits_beside_them(tmp_path):
    task = FewshotTask("t", _touch(tmp_path / "a.tsv"), _touch(tmp_path / "b.tsv"))
    runs = [PretrainRun(f"{s}-seed{x}", s, x) for x in (1, 2) for s in ("random", "cm_gems")]
    acc = {("random", 1): [0.60, 0.70, 0.50], ("cm_gems", 1): [0.65, 0.75, 0.55],
           ("random", 2): [0.62, 0.72, 0.52], ("cm_gems", 2): [0.67, 0.77, 0.57]}
    fewshot = {r.label: {"t": _summary(acc[(r.strategy, r.seed)])} for r in runs}
    rows = {r["metric"]: r for r in paired_stats(runs, [task], fewshot)}
    # Every unit (seed, draw) differs by -0.05: a constant paired difference.
    assert rows["accuracy"]["n"] == 6 and rows["accuracy"]["a"] == "random"
    assert rows["accuracy"]["mean_diff"] == pytest.approx(-0.05)
    assert rows["accuracy"]["ci95"] == pytest.approx([-0.05, -0.05])
    assert rows["accuracy"]["verdict"] == "random < cm_gems"
    assert rows["mcc"]["mean_diff"] == pytest.approx(-0.10)
    spread = {(r["strategy"], r["metric"]): r for r in spread_stats(runs, [task], fewshot)}
    s = spread[("random", "accuracy")]
    assert (s["seeds"], s["draws"]) == (2, 3)
    assert s["between_draws_std"] == pytest.approx(0.1)  # std of 0.6, 0.7, 0.5
    assert s["between_seeds_std"] == pytest.approx(np.std([0.6, 0.62], ddof=1))
    one = [r for r in runs if r.seed == 1]
    single = {r["metric"]: r for r in spread_stats(one, [task], fewshot)}
    assert single["accuracy"]["between_seeds_std"] is None
    lone = paired_stats(one, [task], {r.label: {"t": _summary(acc[(r.strategy, 1)][:1])}
                                      for r in one})
    assert lone[0]["n"] == 1 and lone[0]["ci95"] is None and "n < 2" in lone[0]["verdict"]


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def test_finished_and_mismatched_runs(tmp_path):
    run = tmp_path / "random"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"mode": "fixed:random", "max_steps": 6}))
    def result(step, stopped_by):
        return RunResult(step=step, stopped_by=stopped_by, output_dir=str(run), mlflow_run_id=None,
                         stage="random", switch_step=None)
    result(3, "SIGUSR1").write(run / "result.json")
    assert RunResult.finished(run) is None  # interrupted: to be resumed, not skipped
    (run / "result.json").write_text("{\"step\": 6")  # cut short by a kill
    assert RunResult.finished(run) is None
    result(6, None).write(run / "result.json")
    assert RunResult.finished(run).step == 6
    assert config_mismatch(run, {"mode": "fixed:random", "max_steps": 6}) is None
    assert "max_steps is 6 there, 8 requested" in config_mismatch(run, {"max_steps": 8})


@pytest.mark.slow
def test_cli_refuses_bad_input_before_any_run(tmp_path):
    out = tmp_path / "cmp"
    res = run_module(COMPARE, "--output-dir", str(out), "--", "--output-dir", "x", check=False,
                     cwd=tmp_path)
    assert res.returncode == 2 and "--output-dir cannot be passed through" in res.stderr
    res = run_module(COMPARE, "--output-dir", str(out), "--fewshot", "t=/nonexistent.tsv:b.tsv",
                     check=False, cwd=tmp_path)
    assert res.returncode == 2 and "/nonexistent.tsv does not exist" in res.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing written


def test_help_explains_every_option():
    out = run_module(COMPARE, "--help").stdout
    for opt in ("--strategies", "--output-dir", "--data-dir", "--max-steps", "--model", "--seed",
                "--num-gpus", "--pretrain-args", "--fewshot", "--runs", "--shots",
                "--finetune-epochs", "--experiment"):
        assert opt in out


def test_report_shows_switch_steps_and_the_perplexity_matrix(tmp_path):
    """Every cm_gems run's switch step ("none" when it never switched), and each model under each
    frozen validation masking, "n/a" for a run whose result.json lacks final_ppl."""
    def result(ppl_ref, events=(), final=None):
        return RunResult(step=10, stopped_by=None, output_dir="x", mlflow_run_id=None,
                         stage="global", switch_step=events[0]["step"] if events else None,
                         events=list(events), history=[{"step": 10, "ppl_ref": ppl_ref}],
                         final_ppl=final)

    results = {"random": result(9.0, final={"random": 9.0, "genemask": 12.5, "global": 30.25}),
               "global": result(11.0),
               "cm_gems": result(8.5, [{"step": 4, "from": "genemask", "to": "global"}],
                                 {"random": 8.5, "genemask": 10.0, "global": 20.0}),
               "cm_step": result(10.0, final={"random": 10.0, "global": 25.0})}
    md = markdown_table(list(results), results, [], {}).splitlines()
    main = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in md[2:6]}
    assert main["cm_gems"][3] == "4" and main["random"][3] == "—"
    at = md.index("| strategy | random masking | genemask masking | global masking |")
    assert md[at + 2:at + 6] == ["| random | 9.000 | 12.500 | 30.250 |",
                                 "| global | n/a | n/a | n/a |",
                                 "| cm_gems | 8.500 | 10.000 | 20.000 |",
                                 "| cm_step | 10.000 | n/a | 25.000 |"]
    never = markdown_table(["cm_gems"], {"cm_gems": result(8.0)}, [], {})
    assert "| cm_gems | cm_gems | 8.000 (step 10) | none |" in never


# ---------------------------------------------------------------------- end to end
def store_rows(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


@pytest.mark.slow
def test_failed_pretraining_names_strategy_and_log(tiny_dataset, tmp_path):
    out = tmp_path / "cmp"
    res = run_module(COMPARE, "--output-dir", str(out), "--strategies", "random",
                     "--data-dir", str(tiny_dataset), "--pretrain-args", "--lr -1", check=False,
                     cwd=tmp_path)
    log = out / "logs" / "random.log"
    assert res.returncode == 2, res.stderr[-2000:]  # pretraining's own input error, passed on
    assert f"pretraining of strategy 'random' failed (exit 2); full log: {log}" in res.stderr
    assert "lr must be > 0" in log.read_text()
    assert not (out / "mlflow.db").exists()  # the one store of the working directory
    status = store_rows(tmp_path / "runs" / "mlflow.db", "SELECT status FROM runs")
    assert status == [("FAILED",)]  # the parent run; no child was ever created
    assert not (out / "comparison.md").exists()


@pytest.mark.slow
def test_compare_two_strategies_end_to_end_and_rerun(tiny_dataset, prom, tmp_path):
    out = tmp_path / "cmp"
    pool, test = prom / "100" / "train.tsv", prom / "test.tsv"
    args = [COMPARE, "--output-dir", str(out), "--strategies", "random,cm_gems",
            "--data-dir", str(tiny_dataset), "--max-steps", "6", "--num-gpus", "0",
            "--fewshot", f"prom10={pool}:{test}", "--shots", "10", "--runs", "2",
            "--finetune-epochs", "2", "--pretrain-args", TINY_PRETRAIN]
    first = run_module(*args, timeout=900, cwd=tmp_path)
    assert "skipping" not in first.stdout
    assert "prom10: accuracy" in first.stdout and "10 per class from a pool of 200" in first.stdout

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

    # The 3 x 5 perplexity matrix (here 3 x 2) from result.json's final_ppl, n/a where absent.
    at = md.index("| strategy | random masking | genemask masking | global masking |")
    matrix = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
              for r in md[at + 2:at + 4]}
    for s in ("random", "cm_gems"):
        final = results[s].get("final_ppl") or {}
        assert matrix[s] == [f"{final[m]:.3f}" if m in final else "n/a"
                             for m in ("random", "genemask", "global")]
    # How the few-shot sets were drawn, and the same draws for both strategies.
    seeds = f"seeds {DEFAULT_SEED}-{DEFAULT_SEED + 1}"
    assert any(line.startswith(f"- prom10: 2 run(s), {seeds}; training: 10 per class drawn per "
                               f"run from a pool of 200 (100, 100 per class; {pool})")
               for line in md)
    fs = {s: json.loads((out / s / "fewshot" / "prom10.json").read_text()) for s in rows}
    assert [r["train_rows"] for r in fs["random"]["runs"]] == \
        [r["train_rows"] for r in fs["cm_gems"]["runs"]]
    assert fs["random"]["runs"][0]["train_rows"] != fs["random"]["runs"][1]["train_rows"]
    assert any(line.startswith("| random | prom10 | 2 | 10 | 200 | ") for line in md)

    for png in ("ref_perplexity.png", "fewshot_accuracy.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200

    # MLflow: one parent, a child per strategy (the pretraining run) carrying its few-shot metrics,
    # in the store of the working directory that pretraining and finetuning use (runs/).
    db = tmp_path / "runs" / "mlflow.db"
    assert not (out / "mlflow.db").exists()
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
    assert {a.path for a in client.list_artifacts(runs["cmp-random"], "fewshot")} == {
        "fewshot/prom10.json", "fewshot/prom10.predictions.tsv"}

    # Re-run: both pretrainings and few-shot results are reused, nothing new in the store.
    stamps = {s: (out / s / "result.json").stat().st_mtime_ns for s in rows}
    second = run_module(*args, timeout=300, cwd=tmp_path)
    for s in ("random", "cm_gems"):
        assert f"{s}: finished run found in {out / s} (step 6), skipping its pretraining" \
            in second.stdout
        assert (out / s / "result.json").stat().st_mtime_ns == stamps[s]
    assert f"parent run {parent} (reused)" in second.stdout
    assert dict(store_rows(db, "SELECT name, run_uuid FROM runs")) == runs
    assert (out / "comparison.md").read_text().splitlines() == md

    # A finished run is never reused for a different step budget.
    res = run_module(*[a if a != "6" else "8" for a in args], check=False, cwd=tmp_path)
    assert res.returncode == 2
    assert f"{out / 'random'}: holds a finished run with other settings (max_steps is 6 there, " \
        "8 requested)" in res.stderr

    # One seed: the paired units are the two few-shot draws; no spread between seeds to report.
    summary = json.loads((out / "comparison.json").read_text())
    pairs = {(p["a"], p["b"], p["task"], p["metric"]): p for p in summary["paired"]}
    assert set(pairs) == {("random", "cm_gems", "prom10", m) for m in ("accuracy", "f1", "mcc")}
    acc = pairs[("random", "cm_gems", "prom10", "accuracy")]
    diffs = [x["metrics"]["accuracy"] - y["metrics"]["accuracy"]
             for x, y in zip(fs["random"]["runs"], fs["cm_gems"]["runs"])]
    assert acc["n"] == 2 and acc["mean_diff"] == pytest.approx(np.mean(diffs))
    assert acc["verdict"] in ("no difference shown", "random > cm_gems", "random < cm_gems")
    assert all(r["between_seeds_std"] is None for r in summary["spread"])
    assert any(line.startswith("| random | cm_gems | prom10 | accuracy % | 2 | ") for line in md)

    # --seeds: each strategy pretrained once per seed in its own folder; the units pair seed and
    # draw; the spread between seeds sits beside the spread between draws; a re-run reuses all.
    multi = [a if a != str(out) else str(tmp_path / "seeds") for a in args] + ["--seeds", "1,2"]
    run_module(*multi, timeout=900, cwd=tmp_path)
    out2 = tmp_path / "seeds"
    labels = [f"{s}-seed{x}" for x in (1, 2) for s in ("random", "cm_gems")]
    for label in labels:
        config = json.loads((out2 / label / "config.json").read_text())
        assert config["seed"] == int(label[-1]) and (out2 / "logs" / f"{label}.log").is_file()
    summary = json.loads((out2 / "comparison.json").read_text())
    assert summary["seeds"] == [1, 2] and [r["label"] for r in summary["runs"]] == labels
    acc = next(p for p in summary["paired"] if p["metric"] == "accuracy")
    fs2 = {lab: json.loads((out2 / lab / "fewshot" / "prom10.json").read_text())
           for lab in labels}
    diffs = [x["metrics"]["accuracy"] - y["metrics"]["accuracy"] for seed in (1, 2)
             for x, y in zip(fs2[f"random-seed{seed}"]["runs"], fs2[f"cm_gems-seed{seed}"]["runs"])]
    assert acc["n"] == 4 and acc["mean_diff"] == pytest.approx(np.mean(diffs))
    assert acc["ci95"][0] <= acc["mean_diff"] <= acc["ci95"][1]
    spread = {(r["strategy"], r["metric"]): r for r in summary["spread"]}
    means = [fs2[f"random-seed{x}"]["mean"]["accuracy"] for x in (1, 2)]
    assert spread[("random", "accuracy")]["between_seeds_std"] == pytest.approx(
        np.std(means, ddof=1))
    md2 = (out2 / "comparison.md").read_text()
    assert "| random-seed2 | fixed:random |" in md2 and "between seeds" in md2
    again = run_module(*multi, timeout=300, cwd=tmp_path)
    assert all(f"{lab}: finished run found in {out2 / lab}" in again.stdout for lab in labels)
    assert (out2 / "comparison.md").read_text() == md2
