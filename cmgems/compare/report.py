"""A comparison's report: its runs' result.json files and few-shot summaries as markdown tables
(comparison.md: strategies x tasks, the 3 x 5 perplexity matrix, the few-shot draws, the paired
statistics between strategies and the spread between seeds and between draws), PNG plots and one
JSON (comparison.json)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from cmgems.compare.config import STRATEGY_MODES, FewshotTask, PretrainRun, strategy_label
from cmgems.masking.names import CM_GEMS, MASKINGS
from cmgems.pretrain.result import RunResult
from cmgems.evaluation.report import describe_training
from cmgems.io import atomic_path
from cmgems.evaluation.metrics import METRIC_NAMES, mean_std
from cmgems.evaluation.report import TABLE_METRICS
from cmgems.evaluation.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, fmt, fmt_p, paired
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
                   fewshot: dict[str, dict[str, dict]],
                   modes: dict[str, str] | None = None) -> str:
    """results[label] = its run's result; fewshot[label][task name] = fewshot() summary; a label
    is a strategy, or <strategy>-seed<S> (modes[label] then gives its mode).

    Main table: one row per strategy; final reference perplexity, switch step, and few-shot
    accuracy (%) mean ± std per task. Then the 3 x 5 perplexity matrix (each model under each
    frozen validation masking), how each few-shot task was drawn (n per class, pool size), and
    accuracy, macro F1 and MCC per task."""
    head = ["strategy", "mode", "final ppl_ref", "switch step"] + [f"{t.name} acc %" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    modes = modes or STRATEGY_MODES
    for s in strategies:
        ref, sw = results[s].final_ref_ppl(), results[s].switch_step
        row = [s, modes[s], f"{ref[1]:.3f} (step {ref[0]})" if ref else "n/a",
               str(sw) if sw is not None else ("none" if modes[s].partition(",")[0] == CM_GEMS
                                                else "—")]
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


def _units(runs: list[PretrainRun], fewshot: dict[str, dict[str, dict]], strategy: str,
           task: str) -> dict[tuple, dict[str, float]]:
    """(pretraining seed, few-shot run seed) -> that run's metrics, over a strategy's runs."""
    out = {}
    for run in (r for r in runs if r.strategy == strategy):
        f = fewshot.get(run.label, {}).get(task)
        for r in (f or {}).get("runs", []):
            out[(run.seed, r["seed"])] = r["metrics"]
    return out


def paired_stats(runs: list[PretrainRun], tasks: list[FewshotTask],
                 fewshot: dict[str, dict[str, dict]]) -> list[dict]:
    """For every pair of strategies (in the comparison's order), task and metric: a - b over the
    units both have (the same pretraining seed and the same few-shot draw), as
    cmgems.evaluation.stats.paired gives it."""
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    out = []
    for a, b in itertools.combinations(strategies, 2):
        for t in tasks:
            ua, ub = _units(runs, fewshot, a, t.name), _units(runs, fewshot, b, t.name)
            keys = sorted(k for k in ua if k in ub)
            for metric in METRIC_NAMES:
                r = paired([ua[k][metric] for k in keys], [ub[k][metric] for k in keys],
                           names=(a, b))
                out.append({"a": a, "b": b, "task": t.name, "metric": metric, **r.as_dict()})
    return out


def spread_stats(runs: list[PretrainRun], tasks: list[FewshotTask],
                 fewshot: dict[str, dict[str, dict]]) -> list[dict]:
    """For every strategy, task and metric: the spread between few-shot draws (the standard
    deviation over draws within one pretraining, averaged over the seeds) and between
    pretraining seeds (the standard deviation of the seeds' means over draws; None with one
    seed), both ddof=1."""
    out = []
    for s in dict.fromkeys(r.strategy for r in runs):
        for t in tasks:
            per_seed = [[r["metrics"] for r in fewshot.get(run.label, {}).get(t.name, {})
                         .get("runs", [])] for run in runs if run.strategy == s]
            per_seed = [p for p in per_seed if p]
            if not per_seed:
                continue
            for metric in METRIC_NAMES:
                values = [np.array([m[metric] for m in p]) for p in per_seed]
                within = [v.std(ddof=1) for v in values if v.size > 1]
                means = np.array([v.mean() for v in values])
                out.append({"strategy": s, "task": t.name, "metric": metric,
                            "seeds": len(values), "draws": int(min(v.size for v in values)),
                            "between_draws_std": float(np.mean(within)) if within else None,
                            "between_seeds_std": float(means.std(ddof=1))
                            if means.size > 1 else None})
    return out


_SCALE = {key: (scale, digits) for key, _, scale, digits in TABLE_METRICS}
_LABEL = {key: label for key, label, _, _ in TABLE_METRICS}


def _scaled(value: float | None, metric: str) -> str:
    scale, digits = _SCALE[metric]
    return fmt(None if value is None else value * scale, digits)


def stats_markdown(paired_rows: list[dict], spread_rows: list[dict]) -> list[str]:
    lines = ["", (f"Paired differences a - b over the units both strategies have (the same "
                  f"pretraining seed and the same few-shot draw): mean, 95 % percentile bootstrap "
                  f"interval ({BOOTSTRAP_RESAMPLES} resamples of the units, seed "
                  f"{BOOTSTRAP_SEED}), two-sided paired t-test p, and the verdict (\"no "
                  f"difference shown\" when the interval covers 0):"), "",
             "| a | b | task | metric | n | mean a - b | 95 % interval | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in paired_rows:
        ci = r["ci95"]
        interval = (f"[{_scaled(ci[0], r['metric'])}, {_scaled(ci[1], r['metric'])}]"
                    if ci else "n/a")
        lines.append(f"| {r['a']} | {r['b']} | {r['task']} | {_LABEL[r['metric']]} | {r['n']} | "
                     f"{_scaled(r['mean_diff'], r['metric'])} | {interval} | {fmt_p(r['p'])} | "
                     f"{r['verdict']} |")
    lines += ["", ("Spread of each strategy's result: standard deviation between few-shot draws "
                   "(within one pretraining, averaged over seeds) and between pretraining seeds "
                   "(of the seeds' means; n/a with one seed):"), "",
              ("| strategy | task | metric | seeds | draws per seed | between draws | "
               "between seeds |"), "|---|---|---|---|---|---|---|"]
    for r in spread_rows:
        lines.append(f"| {r['strategy']} | {r['task']} | {_LABEL[r['metric']]} | {r['seeds']} | "
                     f"{r['draws']} | {_scaled(r['between_draws_std'], r['metric'])} | "
                     f"{_scaled(r['between_seeds_std'], r['metric'])} |")
    return lines


def write_report(out: Path, runs: list[PretrainRun], results: dict[str, RunResult],
                 tasks: list[FewshotTask], fewshot: dict[str, dict[str, dict]],
                 name: str) -> list[Path]:
    """comparison.md, ref_perplexity.png, fewshot_accuracy.png (with tasks) and comparison.json in
    out, each written atomically; returns their paths. results and fewshot are keyed by each
    run's label."""
    labels = [r.label for r in runs]
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    modes = {r.label: strategy_label(r.strategy) for r in runs}
    paired_rows = paired_stats(runs, tasks, fewshot) if tasks else []
    spread_rows = spread_stats(runs, tasks, fewshot) if tasks else []
    md = out / "comparison.md"
    with atomic_path(md) as tmp:
        text = (f"# Strategy comparison: {name}\n\n"
                + markdown_table(labels, results, tasks, fewshot, modes))
        if tasks:
            text += "\n".join(stats_markdown(paired_rows, spread_rows)) + "\n"
        tmp.write_text(text)
    paths = [md]
    with atomic_path(out / "ref_perplexity.png") as tmp:
        ref_ppl_plot(labels, results, tmp, f"{name}: validation perplexity, reference masking")
    paths.append(out / "ref_perplexity.png")
    if tasks:
        with atomic_path(out / "fewshot_accuracy.png") as tmp:
            fewshot_plot(labels, [t.name for t in tasks], fewshot, tmp,
                         f"{name}: few-shot accuracy")
        paths.append(out / "fewshot_accuracy.png")
    summary = {"name": name, "strategies": strategies,
               "seeds": list(dict.fromkeys(r.seed for r in runs)),
               "runs": [{"label": r.label, "strategy": r.strategy, "seed": r.seed} for r in runs],
               "tasks": [{"name": t.name, "train": str(t.train), "test": str(t.test)}
                         for t in tasks],
               "pretraining": {s: _pretraining_summary(results[s]) for s in labels},
               "fewshot": {s: {t: {k: v for k, v in f.items()
                                   if k in ("mean", "std", "shots", "pool", "test")}
                               for t, f in fewshot.get(s, {}).items()}
                           for s in labels},
               "paired": paired_rows, "spread": spread_rows}
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
