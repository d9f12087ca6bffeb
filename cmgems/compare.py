"""Comparing masking strategies: what to run, what finished, and the report (table, plots).

The launcher (launchers/compare.py) pretrains one run per strategy and finetunes each export on
few-shot tasks; this module holds the parts that need no process launching: parsing the user's
strategy and task lists, telling a finished run from an unfinished one, and turning the runs'
result.json files and few-shot summaries into a markdown table and PNG plots.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .errors import InputError  # noqa: E402

# Strategy name -> PretrainConfig.mode; the order is the paper's (baselines first).
STRATEGY_MODES = {"random": "fixed:random", "genemask": "fixed:genemask",
                  "global": "fixed:global", "cm_step": "cm_step", "cm_gems": "cm_gems"}
DEFAULT_STRATEGIES = tuple(STRATEGY_MODES)
TASK_FILE_SUFFIXES = (".tsv", ".csv")


def parse_strategies(text: str) -> list[str]:
    """'random,cm_gems' -> ['random', 'cm_gems'] (order kept, duplicates refused)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError("--strategies: empty list")
    unknown = [s for s in names if s not in STRATEGY_MODES]
    if unknown:
        raise InputError(f"--strategies: unknown strategy {unknown[0]!r}; choose from "
                         f"{', '.join(STRATEGY_MODES)}")
    if len(set(names)) != len(names):
        raise InputError(f"--strategies: {text!r} names a strategy twice")
    return names


@dataclass(frozen=True)
class FewshotTask:
    """One few-shot evaluation: a training and a test file (.tsv k-mer text or .csv)."""

    name: str  # label in the table, the plots and the MLflow metric names
    train: Path  # training file (read as blocks of --shots examples per class when given)
    test: Path  # test file

    def __post_init__(self):
        if not self.name or any(c in self.name for c in "|\n"):
            raise InputError(f"few-shot task name {self.name!r}: must be non-empty, without '|'")
        for what, path in (("train", self.train), ("test", self.test)):
            if not path.is_file():
                raise InputError(f"few-shot task {self.name}: {what} file {path} does not exist")
            if path.suffix not in TASK_FILE_SUFFIXES:
                raise InputError(f"few-shot task {self.name}: {what} file {path} must end in "
                                 f"{' or '.join(TASK_FILE_SUFFIXES)}")

    @property
    def slug(self) -> str:
        """File-name-safe form of the name (for the per-task JSON of each strategy)."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


def _task_file(folder: Path, stem: str) -> Path | None:
    for suffix in TASK_FILE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _task_from_folder(name: str | None, folder: Path, spec: str) -> FewshotTask:
    """A folder holding train.tsv/.csv; its test file sits beside it or, as in GeneMask's
    prom-core/<shots>/train.tsv + prom-core/test.tsv layout, one level up."""
    train = _task_file(folder, "train")
    test = _task_file(folder, "test") or _task_file(folder.parent, "test")
    if train is None or test is None:
        raise InputError(f"--fewshot {spec}: folder {folder} needs train.tsv (or .csv) and a "
                         f"test.tsv (or .csv) beside it or in its parent")
    return FewshotTask(name or f"{folder.resolve().parent.name}/{folder.resolve().name}",
                       train, test)


def parse_fewshot(spec: str) -> FewshotTask:
    """NAME=TRAIN:TEST, TRAIN:TEST, NAME=FOLDER or FOLDER (see _task_from_folder)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = None, spec
    elif not name.strip():
        raise InputError(f"--fewshot {spec!r}: empty task name before '='")
    rest = rest.strip()
    if not rest:
        raise InputError(f"--fewshot {spec!r}: no files given")
    if Path(rest).is_dir():
        return _task_from_folder(name, Path(rest), spec)
    train, colon, test = rest.rpartition(":")
    if not colon or not train:
        raise InputError(f"--fewshot {spec!r}: expected NAME=TRAIN:TEST or a folder "
                         f"({rest} is not a folder)")
    train_p, test_p = Path(train), Path(test)
    return FewshotTask(name or f"{train_p.resolve().parent.name}/{train_p.stem}", train_p, test_p)


def unique_tasks(tasks: list[FewshotTask]) -> list[FewshotTask]:
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InputError(f"--fewshot: two tasks are named {dup!r}; name them with NAME=...")
    return tasks


def finished_result(run_dir: Path) -> dict | None:
    """A run's result.json when it trained to the end (stopped_by null), else None."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return None  # a half-written file: the run did not finish cleanly
    if result.get("stopped_by") is not None or not (Path(run_dir) / "export" / "config.json").is_file():
        return None
    return result


def config_mismatch(run_dir: Path, expected: dict) -> str | None:
    """Which requested field a finished run's config.json contradicts, if any (a run kept from an
    earlier comparison with other settings must not be reused silently)."""
    path = Path(run_dir) / "config.json"
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path} is missing or unreadable"
    for key, want in expected.items():
        have = got.get(key)
        if key == "data_dir" and have is not None:
            same = Path(have).resolve() == Path(want).resolve()
        else:
            same = have == want
        if not same:
            return f"{key} is {have!r} there, {want!r} requested"
    return None


def switch_step(result: dict) -> int | None:
    events = result.get("events") or []
    return int(events[0]["step"]) if events else None


def final_ref_ppl(result: dict) -> tuple[int, float] | None:
    hist = result.get("history") or []
    return (int(hist[-1]["step"]), float(hist[-1]["ppl_ref"])) if hist else None


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


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
            row.append(_pm(f["mean"]["accuracy"], f["std"]["accuracy"]) if f else "n/a")
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
                             f"{_pm(m['accuracy'], sd['accuracy'])} | {_pm(m['f1'], sd['f1'])} | "
                             f"{_pm(m['mcc'], sd['mcc'], 1.0, 3)} |")
    return "\n".join(lines) + "\n"


def ref_ppl_plot(strategies: list[str], results: dict[str, dict], path: str | Path,
                 title: str = "") -> Path:
    """Validation perplexity under the fixed reference masking, one curve per strategy; each
    curriculum switch drawn as a dashed line in its strategy's colour."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, s in enumerate(strategies):
        hist = results[s].get("history") or []
        color = f"C{i}"
        ax.plot([h["step"] for h in hist], [h["ppl_ref"] for h in hist], marker="o", ms=3,
                color=color, label=s)
        for e in results[s].get("events") or []:
            ax.axvline(e["step"], color=color, ls="--", lw=1)
            ax.annotate(f"{s}: {e['from']} -> {e['to']}\nstep {e['step']}", (e["step"], 0.97),
                        xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8,
                        color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (reference random masking)")
    ax.set_yscale("log")
    ax.set_title(title or "validation perplexity under the reference masking", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def fewshot_plot(strategies: list[str], tasks: list[FewshotTask],
                 fewshot: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """Few-shot test accuracy, grouped by task, one bar per strategy, std as error bars."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.9 * len(tasks) * len(strategies) * 0.5), 4.5),
                           dpi=110)
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(tasks))
    for i, s in enumerate(strategies):
        got = [fewshot.get(s, {}).get(t.name) for t in tasks]
        means = [100 * g["mean"]["accuracy"] if g else np.nan for g in got]
        stds = [100 * g["std"]["accuracy"] if g else 0.0 for g in got]
        ax.bar(x + (i - (len(strategies) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               color=f"C{i}", label=s)
    ax.set_xticks(x, [t.name for t in tasks], fontsize=9)
    ax.set_ylabel("test accuracy % (mean ± std over runs)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "few-shot accuracy per strategy", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
