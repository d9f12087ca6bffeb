"""The GUE suite end to end on a tiny GUE-shaped folder: two models, three tasks, the markdown
table, the JSON, MLflow runs; DNABERT-2's per-task settings; bad inputs exit 2."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cmgems import gue as gue_lib
from cmgems.errors import InputError
from cmgems.tasks import GUE_TASKS, discover_gue_tasks
from conftest import run_module
from launchers import gue
from test_finetune import easy_rows, make_model, one_torch_thread, write_csv  # noqa: F401

TINY = {"EMP/H3": False, "prom/prom_core_all": True, "tf/0": True}


def make_gue(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in TINY:
        d = root / name
        d.mkdir(parents=True)
        for split, n in (("train", 32), ("dev", 12), ("test", 24)):
            write_csv(d / f"{split}.csv", easy_rows(rng, n, length=30))
    return root


def cells(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| Task"):
            parts = [p.strip() for p in line.strip("|").split("|")]
            rows[parts[0].replace("**", "")] = [p.replace("**", "") for p in parts[1:]]
    return rows


def test_suite_end_to_end_two_models(tmp_path):
    root = make_gue(tmp_path / "GUE")
    models = [make_model(tmp_path / "random" / "export", seed=1),
              make_model(tmp_path / "cm_gems" / "export", seed=2)]
    out = tmp_path / "out"
    rc = gue.main([str(root), *map(str, models), "--out", str(out), "--epochs", "1", "--runs", "1",
                   "--runs-root", str(tmp_path / "runs"), "--experiment", "gue-test"])
    assert rc == 0
    md = (out / "gue.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Task"))
    assert header == "| Task | random/export | cm_gems/export |"
    rows = cells(md)
    assert set(TINY) <= set(rows)
    assert "Human mean (2 tasks)" in rows and "Non-human mean (1 tasks)" in rows
    data = json.loads((out / "gue.json").read_text())
    for col, model in enumerate(["random/export", "cm_gems/export"]):
        res = data["results"][model]
        for task in TINY:
            mcc = 100 * res[task]["mean"]["mcc"]
            assert -100 <= mcc <= 100 and rows[task][col] == f"{mcc:.2f}"
            assert res[task]["runs"][0]["dev_metrics"] is not None
        human = np.mean([100 * res[t]["mean"]["mcc"] for t, h in TINY.items() if h])
        assert float(rows["Human mean (2 tasks)"][col]) == pytest.approx(human, abs=0.006)
    # The tasks' own settings, only the epochs overridden.
    params = data["results"]["random/export"]["prom/prom_core_all"]["params"]
    assert params["max_length"] == 80 and params["lr"] == 3e-5 and params["epochs"] == 1
    assert params["batch_size"] == 8 and params["warmup_steps"] == 50

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gue-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 6 and len(runs) == 12
    assert {r.info.run_name for r in parents} == {
        f"gue/{t}/{m}" for t in TINY for m in ("random/export", "cm_gems/export")}


def test_markdown_table_means_and_std():
    tasks = [t for t in GUE_TASKS if t.name in ("EMP/H3", "EMP/H4", "tf/1")]

    def res(*mccs):
        v = np.array(mccs)
        return {"mean": {"mcc": v.mean()}, "std": {"mcc": v.std(ddof=1) if len(v) > 1 else 0.0},
                "runs": [{}] * len(v)}

    results = {"m": {"EMP/H3": res(0.5, 0.7), "EMP/H4": res(0.2, 0.2), "tf/1": res(0.1, 0.3)}}
    rows = cells(gue_lib.markdown_table(results, tasks, ["m"]))
    assert rows["EMP/H3"] == ["60.00 ± 14.14"]
    assert rows["Non-human mean (2 tasks)"] == ["40.00"]
    assert rows["Human mean (1 tasks)"] == ["20.00"]


def test_task_settings_follow_dnabert2_scripts():
    by = {t.name: t for t in GUE_TASKS}
    assert len(GUE_TASKS) == 28
    assert (by["prom/prom_core_tata"].max_length, by["prom/prom_core_tata"].epochs) == (80, 10)
    assert (by["splice/reconstructed"].max_length, by["splice/reconstructed"].epochs) == (410, 5)
    assert by["mouse/3"].max_steps == 1000 and by["virus/covid"].grad_accum == 4
    human = {t.name.split("/")[0] for t in GUE_TASKS if t.human}
    assert human == {"prom", "tf", "splice"}
    ns = argparse.Namespace(lr=None, epochs=None, max_steps=None, max_length=None, device="cpu")
    cfg = gue_lib.task_config(by["mouse/0"], ns)
    assert (cfg.max_steps, cfg.max_length, cfg.warmup_steps, cfg.lr) == (1000, 110, 30, 3e-5)
    ns.epochs = 1
    assert gue_lib.task_config(by["mouse/0"], ns).max_steps is None


def test_discovery_errors(tmp_path):
    with pytest.raises(InputError, match="no GUE task folders"):
        discover_gue_tasks(tmp_path)
    (tmp_path / "EMP" / "H3").mkdir(parents=True)
    write_csv(tmp_path / "EMP" / "H3" / "train.csv", [("ACGTACGT", 0)])
    with pytest.raises(InputError, match=r"H3: task folder lacks dev\.csv, test\.csv"):
        discover_gue_tasks(tmp_path)


def test_cli_missing_root_exits_2(tmp_path):
    res = run_module("-m", "launchers.gue", str(tmp_path / "nope"), str(tmp_path / "model"),
                     "--out", str(tmp_path / "out"), check=False, timeout=300)
    assert res.returncode == 2
    assert re.match(r"error: .*nope: GUE root is not a directory", res.stderr)
    assert not (tmp_path / "out").exists()
