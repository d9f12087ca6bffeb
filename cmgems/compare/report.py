"""A comparison's report: its runs' result.json files and few-shot summaries as markdown tables
(comparison.md: strategies x tasks, the 3 x 5 perplexity matrix, the few-shot draws), PNG plots
and one JSON (comparison.json)."""
from __future__ import annotations

import json
from pathlib import Path

from cmgems.compare.config import STRATEGY_MODES, FewshotTask
from cmgems.masking.names import CM_GEMS, MASKINGS
from cmgems.pretrain.result import RunResult
from cmgems.evaluation.report import describe_training
from cmgems.io import atomic_path
from cmgems.evaluation.metrics import mean_std
from cmgems.tracking.plots import fewshot_plot, ref_ppl_plot


def _ppl_cell(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "n/a"


def ppl_matrix(strategies: list[str], results: dict[str, RunResult]) -> list[str]:
    """Each final model's perplexity under each of the three frozen validation maskings: how well
    it predicts what random, GeneMask and GLOBAL (the high-PMI spans) hide."""
    lines = ["| strategy | " + " | ".join(f"{m} masking" for m in MASKINGS) + " |",
             "|---|" + "---|" * len(MASKINGS)]
    for s in strategies:
        ppl = results[s].final_ppl_of()
        lines.append(f"| {s} | " + " | ".join(_ppl_cell(ppl[m]) for m in MASKINGS) + " |")
    return lines


def _task_line(task: FewshotTask, fewshot: dict[str, dict[str, dict]]) -> str | None:
    """How a task's runs were trained, from any strategy's summary (the draw is the same for
    every strategy)."""
    f = next((fs[task.name] for fs in fewshot.values() if task.name in fs), None)
    if f is None:
        return None
    runs = f["runs"]
    return (f"- {task.name}: {len(runs)} run(s), seeds {runs[0]['seed']}-{runs[-1]['seed']}; "
            f"training: {describe_training(f)}; test: {f['test']['size']} examples "
            f"({f['test']['path']})")


def markdown_table(strategies: list[str], results: dict[str, RunResult], tasks: list[FewshotTask],
                   fewshot: dict[str, dict[str, dict]]) -> str:
    """results[strategy] = its run's result; fewshot[strategy][task name] = fewshot() summary.

    Main table: one row per strategy; final reference perplexity, switch step, and few-shot
    accuracy (%) mean ± std per task. Then the 3 x 5 perplexity matrix (each model under each
    frozen validation masking), how each few-shot task was drawn (n per class, pool size), and
    accuracy, macro F1 and MCC per task."""
    head = ["strategy", "mode", "final ppl_ref", "switch step"] + [f"{t.name} acc %" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in strategies:
        ref, sw = results[s].final_ref_ppl(), results[s].switch_step
        row = [s, STRATEGY_MODES[s], f"{ref[1]:.3f} (step {ref[0]})" if ref else "n/a",
               str(sw) if sw is not None else ("none" if STRATEGY_MODES[s] == CM_GEMS else "—")]
        for t in tasks:
            f = fewshot.get(s, {}).get(t.name)
            row.append(mean_std(f["mean"]["accuracy"], f["std"]["accuracy"]) if f else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Final perplexity of each model under each frozen validation masking "
              "(n/a: the run's result.json has no final_ppl):", "",
              *ppl_matrix(strategies, results)]
    described = [d for d in (_task_line(t, fewshot) for t in tasks) if d]
    if described:
        lines += ["", "Few-shot training sets (each run draws its own n per class from the pool; "
                  "the same draws for every strategy):", "", *described]
        lines += ["", "| strategy | task | runs | n per class | pool | accuracy % | macro F1 % | "
                  "MCC |", "|---|---|---|---|---|---|---|---|"]
        for s in strategies:
            for t in tasks:
                f = fewshot.get(s, {}).get(t.name)
                if not f:
                    continue
                m, sd = f["mean"], f["std"]
                lines.append(f"| {s} | {t.name} | {len(f.get('runs', []))} | {f['shots']} | "
                             f"{f['pool']['size']} | {mean_std(m['accuracy'], sd['accuracy'])} | "
                             f"{mean_std(m['f1'], sd['f1'])} | "
                             f"{mean_std(m['mcc'], sd['mcc'], 1.0, 3)} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, strategies: list[str], results: dict[str, RunResult],
                 tasks: list[FewshotTask], fewshot: dict[str, dict[str, dict]],
                 name: str) -> list[Path]:
    """comparison.md, ref_perplexity.png, fewshot_accuracy.png (with tasks) and comparison.json in
    out, each written atomically; returns their paths."""
    md = out / "comparison.md"
    with atomic_path(md) as tmp:
        tmp.write_text(f"# Strategy comparison: {name}\n\n"
                       + markdown_table(strategies, results, tasks, fewshot))
    paths = [md]
    with atomic_path(out / "ref_perplexity.png") as tmp:
        ref_ppl_plot(strategies, results, tmp, f"{name}: validation perplexity, reference masking")
    paths.append(out / "ref_perplexity.png")
    if tasks:
        with atomic_path(out / "fewshot_accuracy.png") as tmp:
            fewshot_plot(strategies, [t.name for t in tasks], fewshot, tmp,
                         f"{name}: few-shot accuracy")
        paths.append(out / "fewshot_accuracy.png")
    summary = {"name": name, "strategies": strategies,
               "tasks": [{"name": t.name, "train": str(t.train), "test": str(t.test)}
                         for t in tasks],
               "pretraining": {s: _pretraining_summary(results[s]) for s in strategies},
               "fewshot": {s: {t: {k: v for k, v in f.items()
                                   if k in ("mean", "std", "shots", "pool", "test")}
                               for t, f in fewshot.get(s, {}).items()}
                           for s in strategies}}
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    paths.append(out / "comparison.json")
    return paths


def _pretraining_summary(result: RunResult) -> dict:
    return {"output_dir": result.output_dir, "mlflow_run_id": result.mlflow_run_id,
            "step": result.step, "switch_step": result.switch_step,
            "final_ppl_ref": (result.final_ref_ppl() or (None, None))[1],
            "final_ppl": result.final_ppl_of(),
            "history": result.history or [], "events": result.events or []}
