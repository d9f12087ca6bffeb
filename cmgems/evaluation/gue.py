"""The GUE suite: finetune and test exported models on every GUE task present, as a table.

Each task uses the published settings for DNABERT k-mer models (cmgems.evaluation.tasks.GUE_TASKS: max
length, epochs, learning rate, 32 examples per optimizer step, warmup, evaluation interval,
autocast on GPU; the weights of lowest dev loss are tested; one run, seed 42), unless an override
is given for every task. The result is a Table-2-style markdown: test MCC x 100 per task (mean ±
std over runs), the human and non-human means (the non-human one without virus/covid, as in the
papers' 27-task averages, then with it), one column per model, then the settings each task
ran with; plus a JSON with every run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from cmgems.options import given_options
from cmgems.errors import InputError
from cmgems.evaluation.finetune import EvalRuns, FinetuneConfig, evaluate, load_task_dir, model_info
from cmgems.io import atomic_path
from cmgems.evaluation.metrics import mean_std
from cmgems.evaluation.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, fmt, fmt_p, paired
from cmgems.evaluation.tasks import LEFT_OUT_OF_PAPER_MEANS, GueTask, discover_gue_tasks

log = logging.getLogger(__name__)

# FinetuneConfig fields a GUE run may set for every task, over the task's own settings.
OVERRIDES = ("epochs", "max_steps", "max_length", "lr", "batch_size", "grad_accum", "precision",
             "device")


def task_config(task: GueTask, overrides: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig of one GUE task; the FinetuneConfig options given in `overrides` (not
    None) replace the task's settings, and epochs given without max_steps drops a task's step
    budget (the mouse tasks')."""
    given = given_options(FinetuneConfig, overrides)
    base = {"lr": task.lr, "epochs": task.epochs, "max_steps": task.max_steps,
            "batch_size": task.batch_size, "grad_accum": task.grad_accum,
            "warmup_steps": task.warmup_steps, "eval_steps": task.eval_steps,
            "max_length": task.max_length, "precision": task.precision}
    if "epochs" in given and "max_steps" not in given:
        base["max_steps"] = None
    return FinetuneConfig(**{**base, **given})


def markdown_table(results: dict[str, dict[str, dict]], tasks, model_names: list[str]) -> str:
    """results[model][task name] = evaluate() output. MCC x 100, 'mean ± std' when runs > 1."""
    def cell(r):
        return mean_std(r["mean"]["mcc"], r["std"]["mcc"], with_std=len(r["runs"]) > 1)

    header = "| Task | " + " | ".join(model_names) + " |"
    lines = [header, "|---|" + "---|" * len(model_names)]
    for t in tasks:
        lines.append(f"| {t.name} | " + " | ".join(cell(results[m][t.name]) for m in model_names)
                     + " |")
    # The papers' averages (DNABERT-2's and CM-GEMS' 27 tasks) leave virus/covid out, so the
    # non-human mean a reader puts beside them does too; the mean with covid follows it.
    non_human = [t for t in tasks if not t.human]
    groups = [("Human mean", [t for t in tasks if t.human]),
              ("Non-human mean", [t for t in non_human if t.name not in LEFT_OUT_OF_PAPER_MEANS])]
    if any(t.name in LEFT_OUT_OF_PAPER_MEANS for t in non_human):
        groups.append(("Non-human mean with virus/covid (not the papers')", non_human))
    for label, group in groups:
        if not group:
            continue
        means = [100 * np.mean([results[m][t.name]["mean"]["mcc"] for t in group])
                 for m in model_names]
        lines.append(f"| **{label}** ({len(group)} tasks) | "
                     + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return "\n".join(lines) + "\n"


def paired_lines(results: dict[str, dict[str, dict]], tasks, model_names: list[str]) -> str:
    """The CM-GEMS paper's Table 3 for every pair of models: a paired t-test of their per-task
    MCCs (x 100) over the tasks, virus/covid left out as in the papers' averages; the same
    numbers as `cmgems gue-compare` on this gue.json."""
    kept = [t.name for t in tasks if t.name not in LEFT_OUT_OF_PAPER_MEANS]
    lines = []
    for i, a in enumerate(model_names):
        for b in model_names[i + 1:]:
            r = paired([100 * results[a][t]["mean"]["mcc"] for t in kept],
                       [100 * results[b][t]["mean"]["mcc"] for t in kept], names=(a, b))
            ci = f"[{fmt(r.ci95[0], 2)}, {fmt(r.ci95[1], 2)}]" if r.ci95 else "n/a"
            lines.append(f"- {a} - {b}: mean difference {fmt(r.mean_diff, 2)} MCC x 100 over "
                         f"{r.n} tasks, 95 % bootstrap interval {ci}, paired t-test p = "
                         f"{fmt_p(r.p)}: {r.verdict}")
    if not lines:
        return ""
    return ("Paired t-test over tasks (virus/covid left out; bootstrap: "
            f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}):\n\n"
            + "\n".join(lines) + "\n")


def settings_table(tasks, configs: dict[str, FinetuneConfig], results: dict[str, dict[str, dict]],
                   runs: EvalRuns) -> str:
    """The settings each task ran with (configs[task name]; the precision as resolved on this
    machine, from the first model's first run)."""
    first = next(iter(results.values()))
    lines = ["| Task | max length | epochs | max steps | lr | batch x accum = per step | warmup "
             "steps | dev every | precision | seeds |", "|---|" + "---|" * 9]
    for t in tasks:
        c = configs[t.name]
        used = first[t.name]["runs"][0]["precision"]
        shown = used if c.precision == used else f"{used} ({c.precision})"
        seeds = (f"{runs.seed}" if runs.runs == 1
                 else f"{runs.seed}-{runs.seed + runs.runs - 1}")
        lines.append(f"| {t.name} | {c.max_length} | {c.epochs} | {c.max_steps or '—'} | {c.lr:g}"
                     f" | {c.batch_size} x {c.grad_accum} = {c.global_batch} | {c.warmup_steps} |"
                     f" {c.eval_steps} | {shown} | {seeds} |")
    return "\n".join(lines) + "\n"


def model_names(model_dirs: list[Path]) -> list[str]:
    """Column names: the dir names, made unique with their parents where they clash."""
    names = [d.resolve().name for d in model_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in model_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in model_dirs]
    return names


def run_suite(gue_root: Path, model_dirs: list[Path], out_dir: Path, *,
              overrides: argparse.Namespace, runs: EvalRuns,
              only: list[str] | None = None, progress: bool = False) -> Path:
    """Finetune every model on every task present (or the `only` ones); write gue.md and
    gue.json to out_dir; return gue.md."""
    gue_root, out_dir = Path(gue_root), Path(out_dir)
    tasks = discover_gue_tasks(gue_root)
    if only:
        unknown = set(only) - {t.name for t in tasks}
        if unknown:
            raise InputError(f"--tasks: {', '.join(sorted(unknown))} not found under {gue_root}")
        tasks = [t for t in tasks if t.name in set(only)]
    infos = [model_info(d) for d in model_dirs]  # check every model before any training
    names = model_names(model_dirs)
    tracking = runs.tracking_target()
    configs = {t.name: task_config(t, overrides) for t in tasks}
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    for info, name in zip(infos, names):
        for task in tasks:
            config = configs[task.name]
            train, dev, test = load_task_dir(info, gue_root / task.name, config)
            log.info("%s: %s (%d train, %d test)", name, task.name, len(train), len(test))
            results[name][task.name] = evaluate(
                info, train, test, dev=dev, runs=runs.runs, seed=runs.seed, config=config,
                tracking=tracking, name=f"gue/{task.name}/{name}", progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, tasks, names)
    pairs = paired_lines(results, tasks, names)
    if pairs:
        table += "\n" + pairs
    md = out_dir / "gue.md"
    with atomic_path(out_dir / "gue.json") as tmp:
        tmp.write_text(json.dumps({"models": dict(zip(names, map(str, model_dirs))),
                                   "tasks": [dataclasses.asdict(t) for t in tasks],
                                   "settings": {n: dataclasses.asdict(c)
                                                for n, c in configs.items()},
                                   "results": results}, indent=2) + "\n")
    with atomic_path(md) as tmp:
        tmp.write_text(f"# GUE: test MCC x 100\n\nGUE root: `{gue_root}`; runs per task: "
                       f"{runs.runs} (seed {runs.seed} + r).\n\n{table}\n## Settings\n\n"
                       "Every task: AdamW (weight decay 0.01, none on biases and LayerNorm), "
                       "linear warmup then linear decay, gradient clipping 1.0, the weights of "
                       "lowest dev loss tested; precision as run (as requested).\n\n"
                       f"{settings_table(tasks, configs, results, runs)}")
    return md
