"""What an evaluation leaves for people: the test predictions as TSV, and the final table."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmgems.io import atomic_path
from cmgems.evaluation.metrics import mean_std

# (metric, label, scale, digits) of the final table.
TABLE_METRICS = (("accuracy", "accuracy %", 100.0, 2), ("f1", "macro F1 %", 100.0, 2),
                 ("mcc", "MCC", 1.0, 3))


def predictions_path(result_json: Path) -> Path:
    """results/x.json -> results/x.predictions.tsv"""
    return result_json.with_name(result_json.stem + ".predictions.tsv")


def write_predictions(path: Path, test, preds: list[np.ndarray]) -> Path:
    """One row per test example in file order: row (0-based), line, label, then each run's
    predicted label (run0, run1, ...)."""
    cols = [np.arange(len(test)), test.lines, test.labels, *preds]
    table = np.column_stack(cols).astype(np.int64)
    header = "\t".join(["row", "line", "label", *(f"run{r}" for r in range(len(preds)))])
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(header + "\n")
            np.savetxt(f, table, fmt="%d", delimiter="\t")
    return path


def describe_training(result: dict) -> str:
    """'10 per class drawn per run from a pool of 2000 (1000, 1000 per class; FILE)' or
    'the whole training file, 1000 examples (...)'."""
    pool = result["pool"]
    counts = ", ".join(map(str, pool["per_class"]))
    if result["shots"] == "all":
        return f"the whole training file in every run: {pool['size']} examples ({counts} per " \
               f"class; {pool['path']})"
    return (f"{result['shots']} per class drawn per run from a pool of {pool['size']} "
            f"({counts} per class; {pool['path']})")


def summary_table(result: dict) -> str:
    """The final table of one task: runs, n per class and pool size, then mean ± std of each
    metric over the runs."""
    runs = result["runs"]
    seeds = [r["seed"] for r in runs]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    lines = [f"{result['name']}: {len(runs)} run(s) ({seed_text}); training: "
             f"{describe_training(result)}; test: {result['test']['size']} examples "
             f"({result['test']['path']})", "",
             "| metric | mean ± std |", "|---|---|"]
    for key, label, scale, digits in TABLE_METRICS:
        lines.append(f"| {label} | "
                     f"{mean_std(result['mean'][key], result['std'][key], scale, digits)} |")
    return "\n".join(lines) + "\n"
