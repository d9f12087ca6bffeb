"""PNG plots of a run: validation perplexity with curriculum switches marked."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def perplexity_plot(history: list[dict], events: list[dict], path: str | Path, title: str) -> Path:
    """history: [{step, ppl, ppl_ref, ...}]; events: [{step, from, to}]."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["ppl"] for h in history], marker="o", ms=3, label="validation (curriculum masking)")
    ax.plot(steps, [h["ppl_ref"] for h in history], marker="s", ms=3,
            label="validation (reference random masking)")
    for e in events:
        ax.axvline(e["step"], color="crimson", ls="--", lw=1)
        ax.annotate(f"{e['from']} -> {e['to']}\nstep {e['step']}", (e["step"], 0.95),
                    xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8,
                    color="crimson")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
