"""cmgems gue-compare as a subprocess on gue.json files written here: per-task MCCs, the paired
t-test over tasks, the percent of a reference table, covid out of the means by default, bad input
exits 2 naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_module
from scipy import stats as scipy_stats

TASKS = {"EMP/H3": False, "prom/prom_core_all": True, "tf/0": True, "mouse/0": False,
         "virus/covid": False}


def write_gue(path: Path, mccs: dict[str, dict[str, float]]) -> Path:
    """A gue.json in run_suite's layout: mccs[model][task] = MCC in [-1, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {m: {t: {"mean": {"mcc": v, "accuracy": 0.5, "f1": 0.5},
                       "std": {"mcc": 0.0, "accuracy": 0.0, "f1": 0.0}, "runs": [{}]}
                   for t, v in per.items()} for m, per in mccs.items()}
    path.write_text(json.dumps({"models": {m: f"/x/{m}" for m in mccs},
                                "tasks": [{"name": t, "human": h} for t, h in TASKS.items()],
                                "results": results}))
    return path


A = {"EMP/H3": 0.60, "prom/prom_core_all": 0.70, "tf/0": 0.50, "mouse/0": 0.40,
     "virus/covid": 0.20}
B = {"EMP/H3": 0.55, "prom/prom_core_all": 0.62, "tf/0": 0.49, "mouse/0": 0.30,
     "virus/covid": 0.60}


def cli(*args, check=True):
    return run_module("-m", "launchers.cli", "gue-compare", *map(str, args), check=check)


def test_paired_test_over_tasks_and_percent_of_reference(tmp_path):
    a = write_gue(tmp_path / "a" / "gue.json", {"cm_gems": A})
    b = write_gue(tmp_path / "b" / "gue.json", {"random": B})
    ref = tmp_path / "ref.tsv"
    ref.write_text("# test reference\ntask\tDNABERT-2\tNT\nEMP/H3\t80.00\t-\n"
                   "prom/prom_core_all\t70.00\t68.0\ntf/0\t50.00\t\n")
    out = json.loads(cli(a, b, "--reference", ref, "--json").stdout)
    kept = ["EMP/H3", "prom/prom_core_all", "tf/0", "mouse/0"]  # covid left out, as the papers
    assert out["left_out_of_means_and_test"] == ["virus/covid"]
    p = out["paired"]
    da, db = [100 * A[t] for t in kept], [100 * B[t] for t in kept]
    assert p["n"] == 4 and p["a"] == "cm_gems" and p["b"] == "random"
    assert p["mean_diff"] == pytest.approx(np.mean(np.subtract(da, db)))
    assert p["p"] == pytest.approx(scipy_stats.ttest_rel(da, db).pvalue)
    assert p["ci95"][0] > 0 and p["verdict"] == "cm_gems > random"
    assert out["means"]["non_human"] == {"n": 2, "a": pytest.approx(50.0),
                                         "b": pytest.approx(42.5)}
    assert out["means"]["non_human_with_covid"]["n"] == 3
    assert out["means"]["non_human_with_covid"]["b"] == pytest.approx((55 + 30 + 60) / 3)
    per = out["percent_of_reference"]["per_task"]
    assert out["percent_of_reference"]["model"] == "DNABERT-2"
    assert per["EMP/H3"]["a"] == pytest.approx(75.0) and per["tf/0"]["b"] == pytest.approx(98.0)
    assert per["mouse/0"]["a"] is None and "mouse/0" in out["percent_of_reference"]["missing"]

    with_covid = json.loads(cli(a, b, "--with-covid", "--json").stdout)
    assert with_covid["paired"]["n"] == 5 and with_covid["left_out_of_means_and_test"] == []
    assert with_covid["means"]["non_human_without_covid"]["n"] == 2

    md = cli(a, b, "--reference", ref, "--reference-model", "NT").stdout
    assert "| prom/prom_core_all | 70.00 | 62.00 | 8.00 | 68.00 | 102.9 | 91.2 |" in md
    assert "Paired t-test over 4 tasks" in md and "cm_gems > random" in md
    assert "virus/covid (not in means/test)" in md


def test_one_file_with_two_models_and_bad_inputs_exit_2_naming_the_file(tmp_path):
    both = write_gue(tmp_path / "gue.json", {"cm_gems": A, "random": B})
    out = json.loads(cli(f"{both}@cm_gems", f"{both}@random", "--json").stdout)
    assert out["paired"]["n"] == 4
    for args, said in (
            ((both, f"{both}@random"), "holds 2 models"),
            ((f"{both}@nope", f"{both}@random"), "no model 'nope'"),
            ((tmp_path / "missing.json", both), "missing.json: cannot read")):
        res = cli(*args, check=False)
        assert res.returncode == 2 and said in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = cli(bad, f"{both}@random", check=False)
    assert res.returncode == 2 and f"{bad}: not JSON" in res.stderr
    big = write_gue(tmp_path / "big" / "gue.json", {"m": {**A, "EMP/H3": 60.0}})
    res = cli(big, f"{both}@random", check=False)
    assert res.returncode == 2 and f"{big}" in res.stderr and "not an MCC" in res.stderr
    ref = tmp_path / "ref.tsv"
    ref.write_text("task\tDNABERT-2\nEMP/H3\tabc\n")
    res = cli(f"{both}@cm_gems", f"{both}@random", "--reference", ref, check=False)
    assert res.returncode == 2 and f"{ref}:2" in res.stderr and "not a number" in res.stderr


def test_shipped_reference_table_parses(tmp_path):
    from cmgems.evaluation.gue_compare import load_reference
    path = Path(__file__).resolve().parents[1] / "data" / "gue_reference_mcc.tsv"
    ref = load_reference(path)
    assert ref and all(isinstance(v, float) for m in ref.values() for v in m.values())
