"""cmgems-finetune: finetune an exported model on a classification task and test it.

Few-shot (GeneMask protocol, the defaults):
    cmgems-finetune MODEL_DIR --train prom-core/10/train.tsv --test prom-core/test.tsv --runs 10
GUE-style folder (train.csv, dev.csv, test.csv):
    cmgems-finetune MODEL_DIR --task-dir GUE/prom/prom_core_all --lr 3e-5 --epochs 4 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cmgems.options import add_arguments, from_args
from cmgems.errors import EXIT_INPUT_ERROR, InputError
from cmgems.finetune import EvalRuns, FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmgems-finetune", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path,
                   help="exported model: save_pretrained BERT (config.json, weights) + vocab.txt; "
                        "k follows from the vocabulary size")
    src = p.add_argument_group("data (either --task-dir, or --train and --test)")
    src.add_argument("--task-dir", type=Path,
                     help="GUE/DNABERT-2 task folder: train.csv, test.csv and optional dev.csv "
                          "(header sequence,label; raw nucleotides)")
    src.add_argument("--train", type=Path,
                     help="training file: .tsv (GeneMask few-shot: \"sequence\"<TAB>\"label\", "
                          "space-separated k-mers) or .csv (sequence,label)")
    src.add_argument("--test", type=Path, help="test file, same formats as --train")
    src.add_argument("--shots", type=int, default=None,
                     help="examples per class in each run's training set: the training file is "
                          "read as consecutive blocks of SHOTS per class, run r uses block r mod "
                          "blocks (default: the whole file for every run)")
    src.add_argument("--name", default=None,
                     help="task name for MLflow and the output (default from the paths)")
    src.add_argument("--out", type=Path, default=None,
                     help="write the results JSON here (mean, std, per-run metrics, parameters)")
    g = add_arguments(p, FinetuneConfig, title="finetuning hyperparameters (defaults: GeneMask "
                      "few-shot reference)")
    g.add_argument("--last-weights", dest="select_best", action="store_const", const=False,
                   help="the same as --no-select-best")
    runs = add_arguments(p, EvalRuns, title="runs and results")
    runs.add_argument("-v", "--verbose", action="store_true", help="log every run's metrics")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.task_dir is not None and (args.train or args.test):
            raise InputError("give either --task-dir or --train/--test, not both")
        if args.task_dir is None and not (args.train and args.test):
            raise InputError("give --task-dir, or both --train and --test")
        from cmgems.finetune import fewshot, finetune_task
        config, runs = from_args(FinetuneConfig, args), from_args(EvalRuns, args)
        common = dict(runs=runs.runs, seed=runs.seed, config=config,
                      tracking=runs.tracking_target(), name=args.name, out_json=args.out)
        if args.task_dir is not None:
            if args.shots is not None:
                raise InputError("--shots applies to --train/--test files only")
            result = finetune_task(args.model_dir, args.task_dir, **common)
        else:
            result = fewshot(args.model_dir, args.train, args.test, shots=args.shots, **common)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(json.dumps({"name": result["name"], "runs": len(result["runs"]), "mean": result["mean"],
                      "std": result["std"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
