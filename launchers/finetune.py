"""cmgems-finetune: finetune an exported model on a classification task and test it.

Few-shot (GeneMask protocol, the defaults): run r trains on its own draw of n examples per class
from the training pool, seeded by (seed, r):
    cmgems-finetune MODEL_DIR --train prom-core/1000/train.tsv --shots 10 \\
        --test prom-core/test.tsv --runs 10
GUE-style folder (train.csv, dev.csv, test.csv):
    cmgems-finetune MODEL_DIR --task-dir GUE/prom/prom_core_all --lr 3e-5 --epochs 4 \\
        --batch-size 8 --grad-accum 4 --precision auto --runs 1 --seed 42
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "cmgems").is_dir():  # run from a checkout: its own cmgems, not an installed copy
    sys.path.insert(0, str(ROOT))

from cmgems.options import add_arguments, from_args, parse_int  # noqa: E402
from cmgems.errors import EXIT_INPUT_ERROR, InputError  # noqa: E402
from cmgems.evaluation.finetune import EvalRuns, FinetuneConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmgems-finetune", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path,
                   help="exported model: save_pretrained BERT (config.json, weights) + vocab.txt; "
                        "k follows from the vocabulary size")
    src = p.add_argument_group("data (either --task-dir, or --train/--pool and --test)")
    src.add_argument("--task-dir", type=Path,
                     help="GUE/DNABERT-2 task folder: train.csv, test.csv and optional dev.csv "
                          "(header sequence,label; raw nucleotides); every run trains on all of "
                          "train.csv")
    src.add_argument("--train", type=Path,
                     help="few-shot training file: .tsv (GeneMask: \"sequence\"<TAB>\"label\", "
                          "space-separated k-mers) or .csv (sequence,label); the pool each run "
                          "draws from unless --pool names another")
    src.add_argument("--pool", type=Path, default=None,
                     help="a larger training file (same formats) to draw each run's examples "
                          "from; --train then only gives the number of shots when --shots is "
                          "not given")
    src.add_argument("--shots", type=parse_int, default=None, metavar="N",
                     help="n: examples per class in each run's training set, drawn without "
                          "replacement from the pool by run (numpy default_rng([seed, run])); "
                          "without it, --train (else the pool) must hold exactly n of every "
                          "class, and n is that count")
    src.add_argument("--test", type=Path, help="test file, same formats as --train")
    src.add_argument("--name", default=None,
                     help="task name for MLflow and the output (default from the paths)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None,
                     help="write the results JSON here (mean, std, per-run metrics and training "
                          "rows, parameters) and the test predictions beside it "
                          "(NAME.predictions.tsv)")
    out.add_argument("--save-model", type=Path, default=None, metavar="DIR",
                     help="save the finetuned classifier (save_pretrained, with the export's "
                          "vocabulary and tokenizer files): DIR for one run, DIR/run-<r> for "
                          "several; DIR must not exist or be empty")
    g = add_arguments(p, FinetuneConfig, title="finetuning hyperparameters (defaults: GeneMask "
                      "few-shot reference)")
    g.add_argument("--last-weights", dest="select_best", action="store_const", const=False,
                   help="the same as --no-select-best")
    EvalRuns.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    EvalRuns.configure_logging(args.verbose)
    try:
        few = args.train is not None or args.pool is not None
        if args.task_dir is not None and (few or args.test):
            raise InputError("give either --task-dir or --train/--pool and --test, not both")
        if args.task_dir is None and not (few and args.test):
            raise InputError("give --task-dir, or --train (or --pool) and --test")
        if args.task_dir is not None and args.shots is not None:
            raise InputError("--shots applies to --train/--pool files only")
        from cmgems.evaluation.report import summary_table
        from cmgems.evaluation.finetune import fewshot, finetune_task
        config, runs = from_args(FinetuneConfig, args), from_args(EvalRuns, args)
        common = dict(runs=runs.runs, seed=runs.seed, config=config,
                      tracking=runs.tracking_target(), name=args.name, out_json=args.out,
                      save_model=args.save_model, progress=True)
        if args.task_dir is not None:
            result = finetune_task(args.model_dir, args.task_dir, **common)
        else:
            result = fewshot(args.model_dir, args.train, args.test, shots=args.shots,
                             pool=args.pool, **common)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(summary_table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
