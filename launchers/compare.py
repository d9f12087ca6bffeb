"""Compare masking strategies in one command: pretrain each, then evaluate each.

    python launchers/compare.py --output-dir runs/compare --max-steps 300 --shots 10 \\
        --fewshot prom-core=/path/prom-core/1000/train.tsv:/path/prom-core/test.tsv --runs 10
    python launchers/compare.py --output-dir runs/grch38-cmp --config launchers/configs/reference.yaml \\
        --data-dir data/grch38 --model dnabert --num-gpus 8 --shots 10 \\
        --fewshot prom-core=/path/prom-core/1000/train.tsv:/path/prom-core/test.tsv \\
        -- --zero-stage 2 --micro-batch-size 25

Every strategy (default: random, genemask, global, cm_step, cm_gems) is pretrained with the same
config, seed and data order as a subprocess of launchers/pretrain.py (under `deepspeed --num_gpus N`
when GPUs are used, else plain python), into OUTPUT_DIR/<strategy>. Then each export is finetuned on
every --fewshot task: --runs seeded runs, run r on its own draw of --shots examples per class from
the task's training file (the same draws for every strategy), mean and std. Written to OUTPUT_DIR:
comparison.md (strategy x task table, final reference perplexity, switch step; each model's
perplexity under the random, genemask and global validation maskings; n per class and pool size),
ref_perplexity.png, fewshot_accuracy.png, comparison.json, logs/<strategy>.log. The report pairs
every two strategies over the few-shot runs sharing a pretraining seed and a draw: mean
difference, 95 % bootstrap interval, paired t-test p, n and a verdict ("paired" in the JSON), and
gives the spread between draws beside the spread between seeds. --seeds S1,S2,... pretrains every
strategy once per seed, into OUTPUT_DIR/<strategy>-seed<S>. MLflow, in the
store pretraining and finetuning use from this working directory: one parent run (OUTPUT_DIR's
name) holding the report as artifacts, one child run per strategy (its pretraining run, plus the
few-shot metrics fewshot/<task>/<metric>_mean|_std).

Re-running with the same --output-dir skips strategies whose pretraining finished and few-shot
results already computed with the same settings; an unfinished run is resumed from its last
checkpoint. A failed pretraining run stops the comparison, naming the strategy and its log file.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems import logs  # noqa: E402
from cmgems.compare.config import CompareConfig  # noqa: E402
from cmgems.compare.run import RunFailed, run_comparison  # noqa: E402
from cmgems.options import add_arguments, from_args  # noqa: E402
from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.evaluation.finetune import FinetuneConfig  # noqa: E402
from cmgems.pretrain.process import Interrupted  # noqa: E402

PRETRAIN = Path(__file__).resolve().parent / "pretrain.py"
GROUPS = {"what to compare": ("strategies", "output_dir", "name", "experiment"),
          "pretraining (the same for every strategy)": (
              "config", "data_dir", "max_steps", "model", "seed", "seeds", "num_gpus",
              "pretrain_args"),
          "few-shot evaluation of each export (cmgems.evaluation.finetune.fewshot)": (
              "runs", "shots", "fewshot_seed")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, names in GROUPS.items():
        group = add_arguments(p, CompareConfig, title=title, only=names)
    group.add_argument("--fewshot", action="append", default=[], metavar="SPEC",
                       help="a task, repeatable: NAME=TRAIN:TEST, TRAIN:TEST, NAME=FOLDER or "
                            "FOLDER (a folder holding train.tsv/.csv, with test.tsv/.csv in it or "
                            "in its parent, e.g. fewshot/prom-core/10); none: perplexity only")
    # Few-shot files have no dev set: nothing to evaluate during training, nothing to select.
    add_arguments(p, FinetuneConfig, title="finetuning of each few-shot run", prefix="finetune-",
                  skip=("eval_steps", "select_best"))
    return p


def main(argv: list[str] | None = None) -> int:
    logs.configure(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)  # the rest goes to every pretraining
    args = build_parser().parse_args(argv[:cut])
    try:
        run_comparison(from_args(CompareConfig, args),
                       from_args(FinetuneConfig, args, prefix="finetune-"), argv[cut + 1:],
                       PRETRAIN)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (RunFailed, Interrupted) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
