"""Two models' GUE results side by side with the CM-GEMS paper's statistics: Table 3's paired
t-test between their per-task MCCs, and Fig. 3's percent of a reference model per task.

Inputs are gue.json files as cmgems.evaluation.gue.run_suite writes them ("results"[model][task]
["mean"]["mcc"], MCC in [-1, 1]; "tasks" with each task's human flag), and optionally a reference
table of published MCCs (x 100), a TSV:

    # comment lines (the source) start with '#'
    task	DNABERT-2	NT-2500M-multi
    EMP/H3	78.27	...

Means and the test leave virus/covid out by default, as the CM-GEMS and DNABERT-2 papers' 27-task
averages do; include_covid puts it back. Torch-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.evaluation.stats import fmt, fmt_p, paired
from cmgems.evaluation.tasks import GUE_TASKS, LEFT_OUT_OF_PAPER_MEANS

_HUMAN = {t.name: t.human for t in GUE_TASKS}


@dataclass(frozen=True)
class GueScores:
    """One model's test MCC x 100 per task, from one gue.json."""

    name: str
    path: Path
    mcc: dict[str, float]  # task -> MCC x 100
    human: dict[str, bool]  # task -> counted in the human mean


def load_gue(spec: str) -> GueScores:
    """FILE (a gue.json holding one model) or FILE@MODEL (one of several)."""
    path_text, model = spec, None
    if not Path(spec).is_file() and "@" in spec:
        path_text, _, model = spec.rpartition("@")
    path = Path(path_text)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results:
        raise InputError(f"{path}: no \"results\" object (expected a gue.json written by "
                         f"`cmgems gue`)")
    if model is None:
        if len(results) != 1:
            raise InputError(f"{path}: holds {len(results)} models ({', '.join(results)}); name "
                             f"one as {path}@MODEL")
        model = next(iter(results))
    elif model not in results:
        raise InputError(f"{path}: no model {model!r}; it holds {', '.join(results)}")
    human = {t["name"]: bool(t["human"]) for t in doc.get("tasks", [])
             if isinstance(t, dict) and "name" in t and "human" in t}
    mcc = {}
    for task, r in results[model].items():
        try:
            value = float(r["mean"]["mcc"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: results[{model!r}][{task!r}] has no mean.mcc") from None
        if not math.isfinite(value) or not -1.0 <= value <= 1.0:
            raise InputError(f"{path}: results[{model!r}][{task!r}] mean.mcc = {value}, not an "
                             f"MCC in [-1, 1]")
        mcc[task] = 100.0 * value
        human.setdefault(task, _HUMAN.get(task, False))
    return GueScores(model, path, mcc, human)


def load_reference(path: Path) -> dict[str, dict[str, float]]:
    """reference[model][task] = published MCC x 100, from the TSV described in the module doc
    (a blank or '-' cell: not published)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    rows = [(i, line) for i, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path}: no header line (task<TAB>MODEL...)")
    (_, header), body = rows[0], rows[1:]
    cols = header.split("\t")
    if cols[0].strip() != "task" or len(cols) < 2:
        raise InputError(f"{path}: header must be 'task<TAB>MODEL[<TAB>MODEL...]', got {header!r}")
    models = [c.strip() for c in cols[1:]]
    out: dict[str, dict[str, float]] = {m: {} for m in models}
    for lineno, line in body:
        cells = line.split("\t")
        if len(cells) != len(cols):
            raise InputError(f"{path}:{lineno}: {len(cells)} columns, the header has {len(cols)}")
        for m, cell in zip(models, cells[1:]):
            cell = cell.strip()
            if cell in ("", "-"):
                continue
            try:
                value = float(cell)
            except ValueError:
                raise InputError(f"{path}:{lineno}: {m}: {cell!r} is not a number") from None
            if not -100.0 <= value <= 100.0:
                raise InputError(f"{path}:{lineno}: {m}: {value} is not an MCC x 100")
            out[m][cells[0].strip()] = value
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def compare(a: GueScores, b: GueScores, reference: dict[str, dict[str, float]] | None = None,
            reference_model: str | None = None, include_covid: bool = False) -> dict:
    """The comparison as one JSON-ready dict: the tasks both models ran, per-task MCCs, the
    means, the paired test of a - b over the tasks (Table 3), and with a reference each model's
    percent of the reference model's MCC per task (Fig. 3)."""
    if a.name == b.name and a.path.resolve() == b.path.resolve():
        raise InputError(f"{a.path}: the same model {a.name!r} given twice")
    left_out = () if include_covid else LEFT_OUT_OF_PAPER_MEANS
    shared = [t for t in a.mcc if t in b.mcc]
    if not shared:
        raise InputError(f"{a.path} and {b.path}: no task in common")
    tasks = [t for t in shared if t not in left_out]
    names = (a.name, b.name) if a.name != b.name else (str(a.path), str(b.path))
    test = paired([a.mcc[t] for t in tasks], [b.mcc[t] for t in tasks], names=names)
    out = {"a": {"name": names[0], "file": str(a.path)}, "b": {"name": names[1], "file": str(b.path)},
           "tasks": shared, "left_out_of_means_and_test": [t for t in shared if t in left_out],
           "mcc": {t: {"a": a.mcc[t], "b": b.mcc[t]} for t in shared},
           "means": {}, "paired": {"a": names[0], "b": names[1], "metric": "mcc_x100",
                                   "test": "paired t-test over tasks", **test.as_dict()},
           "only_in_a": [t for t in a.mcc if t not in b.mcc],
           "only_in_b": [t for t in b.mcc if t not in a.mcc]}
    for label, keep in (("all", lambda t: True), ("human", lambda t: a.human.get(t, False)),
                        ("non_human", lambda t: not a.human.get(t, False))):
        group = [t for t in tasks if keep(t)]
        out["means"][label] = {"n": len(group), "a": _mean([a.mcc[t] for t in group]),
                               "b": _mean([b.mcc[t] for t in group])}
    # The other reading of the non-human mean, so both are at hand whichever is the default.
    other = [t for t in shared if not a.human.get(t, False)]
    alt = other if not include_covid else [t for t in other if t not in LEFT_OUT_OF_PAPER_MEANS]
    key = "non_human_with_covid" if not include_covid else "non_human_without_covid"
    out["means"][key] = {"n": len(alt), "a": _mean([a.mcc[t] for t in alt]),
                         "b": _mean([b.mcc[t] for t in alt])}
    if reference is not None:
        if not reference:
            raise InputError("reference table: no model column")
        ref_name = reference_model or next(iter(reference))
        if ref_name not in reference:
            raise InputError(f"--reference-model {ref_name!r}: not a column of the reference "
                             f"table ({', '.join(reference)})")
        ref = reference[ref_name]
        per_task = {}
        for t in shared:
            r = ref.get(t)
            per_task[t] = {"reference": r,
                           "a": 100.0 * a.mcc[t] / r if r else None,
                           "b": 100.0 * b.mcc[t] / r if r else None}
        out["percent_of_reference"] = {"model": ref_name, "per_task": per_task,
                                       "missing": [t for t in shared if not ref.get(t)]}
    return out


def markdown(result: dict) -> str:
    a, b = result["a"]["name"], result["b"]["name"]
    lines = [f"# GUE: {a} vs {b}", "", "Test MCC x 100 per task."]
    ref = result.get("percent_of_reference")
    head = ["Task", a, b, f"{a} - {b}"]
    if ref:
        head += [f"{ref['model']} (reference)", f"{a} % of ref", f"{b} % of ref"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in result["tasks"]:
        m = result["mcc"][t]
        mark = " (not in means/test)" if t in result["left_out_of_means_and_test"] else ""
        row = [t + mark, fmt(m["a"], 2), fmt(m["b"], 2), fmt(m["a"] - m["b"], 2)]
        if ref:
            p = ref["per_task"][t]
            row += [fmt(p["reference"], 2), fmt(p["a"], 1), fmt(p["b"], 1)]
        lines.append("| " + " | ".join(row) + " |")
    labels = {"all": "Mean", "human": "Human mean", "non_human": "Non-human mean",
              "non_human_with_covid": "Non-human mean with virus/covid (not the papers')",
              "non_human_without_covid": "Non-human mean without virus/covid (the papers')"}
    for key, label in labels.items():
        m = result["means"].get(key)
        if m and m["n"]:
            lines.append(f"| **{label}** ({m['n']} tasks) | **{fmt(m['a'], 2)}** | "
                         f"**{fmt(m['b'], 2)}** | {fmt(m['a'] - m['b'], 2)} |"
                         + (" | | |" if ref else ""))
    p = result["paired"]
    left = result["left_out_of_means_and_test"]
    ci = p["ci95"]
    lines += ["", f"Paired t-test over {p['n']} tasks (Table 3 of the CM-GEMS paper), {a} - {b}: "
              f"mean difference {fmt(p['mean_diff'], 2)} MCC x 100, 95 % bootstrap interval "
              + (f"[{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else "n/a")
              + f" ({p['bootstrap_resamples']} resamples of the tasks, seed 0), p = "
              f"{fmt_p(p['p'])}: **{p['verdict']}**."]
    if left:
        lines.append(f"Left out of the means and the test, as in the papers' 27-task averages: "
                     f"{', '.join(left)} (--with-covid includes it).")
    for side in ("a", "b"):
        only = result[f"only_in_{side}"]
        if only:
            lines.append(f"Only in {result[side]['name']} (not compared): {', '.join(only)}.")
    if ref and ref["missing"]:
        lines.append(f"No reference MCC for: {', '.join(ref['missing'])}.")
    return "\n".join(lines) + "\n"

