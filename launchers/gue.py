"""cmgems-gue: finetune and test one or more exported models on every GUE task present.

GUE_ROOT is the benchmark as DNABERT-2 distributes it (EMP/H3 ... virus/covid, each folder with
train.csv, dev.csv, test.csv). Each task uses the published settings for DNABERT k-mer models
(DNABERT-2's finetune/scripts/run_dnabert1.sh and CM-GEMS' GUE script: max length, epochs,
learning rate 3e-5, warmup, evaluation interval, a global batch of 32 per optimizer step (here
8 x 4 accumulated on one device; virus/covid 8 x 8), fp16 autocast on GPU (bf16 where the GPU has
it; fp32 on CPU), seed 42, one run; the weights of lowest dev loss are tested). The result is a
Table-2-style markdown: test MCC x 100 per task (mean +- std over runs), the human and non-human
means, one column per model, then the settings every task ran with; plus a JSON with every run.

    cmgems-gue GUE/ runs/random/export runs/cm_gems/export --out results/gue
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.options import add_arguments, from_args  # noqa: E402
from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.evaluation.finetune import EvalRuns, FinetuneConfig  # noqa: E402
from cmgems.evaluation.gue import OVERRIDES, run_suite  # noqa: E402

RUN_DEFAULTS = {"seed": 42, "runs": 1}  # DNABERT-2's and CM-GEMS' scripts: one run, seed 42


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
    add_arguments(p, FinetuneConfig, only=OVERRIDES,
                  defaults={name: None for name in OVERRIDES if name != "device"},
                  title="overrides of the published per-task settings, for every task "
                        "(default: each task's own; --epochs alone also drops the mouse tasks' "
                        "max steps)")
    EvalRuns.add_arguments(p, RUN_DEFAULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    EvalRuns.configure_logging(args.verbose)
    try:
        md = run_suite(args.gue_root, args.model_dirs, args.out, overrides=args,
                       runs=from_args(EvalRuns, args, RUN_DEFAULTS), only=args.tasks,
                       progress=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
