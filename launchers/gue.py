"""cmgems-gue: finetune and test one or more exported models on every GUE task present.

GUE_ROOT is the benchmark as DNABERT-2 distributes it (EMP/H3 ... virus/covid, each folder with
train.csv, dev.csv, test.csv). Each task uses DNABERT-2's settings for DNABERT k-mer models
(MAGICS-LAB/DNABERT_2 finetune/scripts/run_dnabert1.sh: max length, epochs, learning rate, batch,
warmup, evaluation interval; weights of lowest dev loss are tested). The result is a Table-2-style
markdown: test MCC x 100 per task (mean +- std over runs), the human and non-human means, one
column per model; plus a JSON with every run.

    cmgems-gue GUE/ runs/export/random runs/export/cm_gems --out results/gue --runs 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

from cmgems.errors import EXIT_INPUT_ERROR, InputError
from launchers.finetune import add_run_options, tracking_from_args

log = logging.getLogger("cmgems.gue")


def task_config(task, args):
    """FinetuneConfig of one GUE task; --epochs/--max-steps/--max-length/--lr override the table."""
    from cmgems.finetune import FinetuneConfig
    return FinetuneConfig(
        lr=args.lr if args.lr is not None else task.lr,
        epochs=args.epochs if args.epochs is not None else task.epochs,
        max_steps=args.max_steps if args.max_steps is not None else (
            None if args.epochs is not None else task.max_steps),
        batch_size=task.batch_size, grad_accum=task.grad_accum, warmup_steps=task.warmup_steps,
        eval_steps=task.eval_steps, weight_decay=0.01, hidden_dropout=0.1,
        max_length=args.max_length if args.max_length is not None else task.max_length,
        overflow="truncate", device=args.device)


def markdown_table(results: dict[str, dict[str, dict]], tasks, model_names: list[str]) -> str:
    """results[model][task name] = evaluate() output. MCC x 100, 'mean ± std' when runs > 1."""
    def cell(r):
        m, s = 100 * r["mean"]["mcc"], 100 * r["std"]["mcc"]
        return f"{m:.2f} ± {s:.2f}" if len(r["runs"]) > 1 else f"{m:.2f}"

    header = "| Task | " + " | ".join(model_names) + " |"
    lines = [header, "|---|" + "---|" * len(model_names)]
    for t in tasks:
        lines.append(f"| {t.name} | " + " | ".join(cell(results[m][t.name]) for m in model_names)
                     + " |")
    for label, human in (("Human mean", True), ("Non-human mean", False)):
        group = [t for t in tasks if t.human == human]
        if not group:
            continue
        means = [100 * np.mean([results[m][t.name]["mean"]["mcc"] for t in group])
                 for m in model_names]
        lines.append(f"| **{label}** ({len(group)} tasks) | "
                     + " | ".join(f"**{v:.2f}**" for v in means) + " |")
    return "\n".join(lines) + "\n"


def model_names(model_dirs: list[Path]) -> list[str]:
    """Column names: the dir names, made unique with their parents where they clash."""
    names = [d.resolve().name for d in model_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in model_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in model_dirs]
    return names


def run_suite(gue_root: Path, model_dirs: list[Path], out_dir: Path, args) -> Path:
    """Finetune every model on every task present; write gue.md and gue.json; return gue.md."""
    from cmgems.finetune import effective_max_length, evaluate, model_info
    from cmgems.tasks import discover_gue_tasks, load_task_file
    from cmgems.io import atomic_path

    tasks = discover_gue_tasks(gue_root)
    if args.tasks:
        wanted = set(args.tasks)
        unknown = wanted - {t.name for t in tasks}
        if unknown:
            raise InputError(f"--tasks: {', '.join(sorted(unknown))} not found under {gue_root}")
        tasks = [t for t in tasks if t.name in wanted]
    infos = [model_info(d) for d in model_dirs]  # check every model before any training
    names = model_names(model_dirs)
    tracking = tracking_from_args(args)
    results: dict[str, dict[str, dict]] = {n: {} for n in names}
    for info, name in zip(infos, names):
        for task in tasks:
            config = task_config(task, args)
            length = effective_max_length(info, config)
            d = gue_root / task.name
            train, dev, test = (load_task_file(d / f, info.k, length, config.overflow)
                                for f in ("train.csv", "dev.csv", "test.csv"))
            log.info("%s: %s (%d train, %d test)", name, task.name, len(train), len(test))
            results[name][task.name] = evaluate(
                info, train, test, dev=dev, runs=args.runs, seed=args.seed, config=config,
                tracking=tracking, name=f"gue/{task.name}/{name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, tasks, names)
    md = out_dir / "gue.md"
    with atomic_path(out_dir / "gue.json") as tmp:
        tmp.write_text(json.dumps({"models": dict(zip(names, map(str, model_dirs))),
                                   "tasks": [dataclasses.asdict(t) for t in tasks],
                                   "results": results}, indent=2) + "\n")
    with atomic_path(md) as tmp:
        tmp.write_text(f"# GUE: test MCC x 100\n\nGUE root: `{gue_root}`; runs per task: "
                       f"{args.runs} (seed {args.seed} + r).\n\n{table}")
    return md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmgems-gue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gue_root", type=Path, help="GUE root holding EMP/, mouse/, prom/, splice/, "
                   "tf/, virus/ task folders (any subset)")
    p.add_argument("model_dirs", type=Path, nargs="+",
                   help="exported models (save_pretrained + vocab.txt), one table column each")
    p.add_argument("--out", type=Path, default=Path("gue_results"),
                   help="output directory for gue.md and gue.json (%(default)s)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="only these tasks, e.g. EMP/H3 prom/prom_core_all (default: all present)")
    g = p.add_argument_group("overrides of DNABERT-2's per-task settings (for quick checks)")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs for every task (also drops the mouse tasks' max steps)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps for every task")
    g.add_argument("--max-length", type=int, default=None, help="tokens per example, every task")
    g.add_argument("--lr", type=float, default=None, help="learning rate for every task")
    g.add_argument("--device", default="auto",
                   help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N' (%(default)s)")
    add_run_options(p, default_seed=42)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        md = run_suite(args.gue_root, args.model_dirs, args.out, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
