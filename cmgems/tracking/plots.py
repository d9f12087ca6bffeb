"""PNG plots: a run's validation perplexity with its curriculum switches marked, and a strategy
comparison's perplexity curves and few-shot accuracy bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _mark_switches(ax, events: list[dict], color: str, y: float, who: str = "") -> None:
    """A dashed line and a label at each curriculum switch."""
    for e in events:
        ax.axvline(e["step"], color=color, ls="--", lw=1)
        ax.annotate(f"{who}{e['from']} -> {e['to']}\nstep {e['step']}", (e["step"], y),
                    xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8,
                    color=color)


def _perplexity_axes(ax, ylabel: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")


def _save(fig, ax, path: str | Path, title: str, legend_loc: str, **grid) -> Path:
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc=legend_loc)
    ax.grid(alpha=0.3, **grid)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def perplexity_plot(history: list[dict], events: list[dict], path: str | Path, title: str) -> Path:
    """history: [{step, ppl, ppl_ref, ...}]; events: [{step, from, to}]."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["ppl"] for h in history], marker="o", ms=3,
            label="validation (curriculum masking)")
    ax.plot(steps, [h["ppl_ref"] for h in history], marker="s", ms=3,
            label="validation (reference random masking)")
    _mark_switches(ax, events, "crimson", 0.95)
    _perplexity_axes(ax, "perplexity")
    return _save(fig, ax, path, title, "lower left")


def ref_ppl_plot(strategies: list[str], results: dict, path: str | Path,
                 title: str = "") -> Path:
    """Validation perplexity under the fixed reference masking, one curve per strategy (results:
    strategy -> its run's cmgems.pretrain.result.RunResult); each curriculum switch drawn as a
    dashed line in its strategy's colour."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, s in enumerate(strategies):
        hist = results[s].history or []
        color = f"C{i}"
        ax.plot([h["step"] for h in hist], [h["ppl_ref"] for h in hist], marker="o", ms=3,
                color=color, label=s)
        _mark_switches(ax, results[s].events or [], color, 0.97, f"{s}: ")
    _perplexity_axes(ax, "perplexity (reference random masking)")
    return _save(fig, ax, path, title or "validation perplexity under the reference masking",
                 "lower left")


def fewshot_plot(strategies: list[str], task_names: list[str],
                 fewshot: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """Few-shot test accuracy, grouped by task, one bar per strategy, std as error bars
    (fewshot: strategy -> task name -> cmgems.evaluation.finetune.fewshot() summary)."""
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.2 + 0.9 * len(task_names) * len(strategies) * 0.5), 4.5), dpi=110)
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(task_names))
    for i, s in enumerate(strategies):
        got = [fewshot.get(s, {}).get(t) for t in task_names]
        means = [100 * g["mean"]["accuracy"] if g else np.nan for g in got]
        stds = [100 * g["std"]["accuracy"] if g else 0.0 for g in got]
        ax.bar(x + (i - (len(strategies) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               color=f"C{i}", label=s)
    ax.set_xticks(x, task_names, fontsize=9)
    ax.set_ylabel("test accuracy % (mean ± std over runs)")
    ax.set_ylim(0, 100)
    return _save(fig, ax, path, title or "few-shot accuracy per strategy", "lower right",
                 axis="y")


def masks_plot(selections, path: str | Path, title: str = "") -> Path:
    """The samples of cmgems.masking.view.selections as rows, one panel per strategy: each
    token's NPMI as a shade of grey (white: special or unscored), its selected positions in red."""
    strategies = list(dict.fromkeys(s.strategy for s in selections))
    rows = {s: [x for x in selections if x.strategy == s] for s in strategies}
    n = max(len(r) for r in rows.values())
    width = max(x.length for x in selections)
    fig, axes = plt.subplots(len(strategies), 1, squeeze=False, dpi=110,
                             figsize=(min(14.0, 3 + width / 40), 0.9 + (0.35 * n + 0.5) *
                                      len(strategies)))
    grey = plt.get_cmap("Greys").copy()
    grey.set_bad("white")
    finite = np.concatenate([x.npmi[np.isfinite(x.npmi)] for x in selections] or [np.zeros(1)])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for ax, strategy in zip(axes[:, 0], strategies):
        shade = np.full((n, width), np.nan)
        picked = np.zeros((n, width), dtype=bool)
        for x in rows[strategy]:
            shade[x.sample, :x.length] = x.npmi
            picked[x.sample, x.selected] = True
        image = ax.imshow(np.ma.masked_invalid(shade), cmap=grey, vmin=low, vmax=high,
                          aspect="auto", interpolation="nearest")
        ax.imshow(np.ma.masked_where(~picked, picked), cmap="autumn", vmin=0, vmax=1,
                  aspect="auto", interpolation="nearest", alpha=0.9)
        ax.set_yticks(range(n), [f"sample {i}" for i in range(n)], fontsize=7)
        ax.set_title(f"{strategy}: {int(picked.sum())} positions selected", fontsize=9)
    axes[-1, 0].set_xlabel("token index ([CLS] = 0)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="NPMI", fraction=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
