"""A comparison's report: its runs' result.json files and few-shot summaries as a markdown table
(comparison.md), PNG plots and one JSON (comparison.json)."""
from __future__ import annotations

import json
from pathlib import Path

from .compare import STRATEGY_MODES, FewshotTask, final_ref_ppl, switch_step
from .io import atomic_path
from .metrics import mean_std
from .plots import fewshot_plot, ref_ppl_plot


def markdown_table(strategies: list[str], results: dict[str, dict], tasks: list[FewshotTask],
                   fewshot: dict[str, dict[str, dict]]) -> str:
    """results[strategy] = result.json; fewshot[strategy][task name] = fewshot() summary.

    Main table: one row per strategy; final reference perplexity, switch step, and few-shot
    accuracy (%) mean ± std per task. A second table gives accuracy, macro F1 and MCC."""
    head = ["strategy", "mode", "final ppl_ref", "switch step"] + [f"{t.name} acc %" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in strategies:
        r = results[s]
        ref = final_ref_ppl(r)
        sw = switch_step(r)
        row = [s, STRATEGY_MODES[s], f"{ref[1]:.3f} (step {ref[0]})" if ref else "n/a",
               str(sw) if sw is not None else ("none" if s == "cm_gems" else "—")]
        for t in tasks:
            f = fewshot.get(s, {}).get(t.name)
            row.append(mean_std(f["mean"]["accuracy"], f["std"]["accuracy"]) if f else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    if tasks:
        lines += ["", "| strategy | task | runs | accuracy % | macro F1 % | MCC |",
                  "|---|---|---|---|---|---|"]
        for s in strategies:
            for t in tasks:
                f = fewshot.get(s, {}).get(t.name)
                if not f:
                    continue
                m, sd = f["mean"], f["std"]
                lines.append(f"| {s} | {t.name} | {len(f.get('runs', []))} | "
                             f"{mean_std(m['accuracy'], sd['accuracy'])} | "
                             f"{mean_std(m['f1'], sd['f1'])} | "
                             f"{mean_std(m['mcc'], sd['mcc'], 1.0, 3)} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, strategies: list[str], results: dict[str, dict],
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
               "fewshot": {s: {t: {k: v for k, v in f.items() if k in ("mean", "std")}
                               for t, f in fewshot.get(s, {}).items()}
                           for s in strategies}}
    with atomic_path(out / "comparison.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    paths.append(out / "comparison.json")
    return paths


def _pretraining_summary(result: dict) -> dict:
    return {"output_dir": result["output_dir"], "mlflow_run_id": result.get("mlflow_run_id"),
            "step": result["step"], "switch_step": switch_step(result),
            "final_ppl_ref": (final_ref_ppl(result) or (None, None))[1],
            "history": result.get("history", []), "events": result.get("events", [])}
