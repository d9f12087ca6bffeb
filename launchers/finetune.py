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

from cmgems.errors import EXIT_INPUT_ERROR, InputError



def add_config_options(p: argparse.ArgumentParser) -> None:
    """Options mapping onto FinetuneConfig (shared with the GUE launcher)."""
    from cmgems.finetune import FinetuneConfig
    d = FinetuneConfig()
    g = p.add_argument_group("finetuning hyperparameters (defaults: GeneMask few-shot reference)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate of AdamW (%(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (%(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per micro-batch (%(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step (%(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="linear warmup as a fraction of all steps, then linear decay to 0 "
                        "(%(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="absolute warmup steps; overrides --warmup-ratio")
    g.add_argument("--max-steps", type=int, default=None,
                   help="total optimizer steps; overrides --epochs")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay, not on biases/LayerNorm (%(default)s)")
    g.add_argument("--hidden-dropout", type=float, default=d.hidden_dropout,
                   help="hidden dropout of the classification model (%(default)s)")
    g.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens per example including [CLS] and [SEP], capped at the model's "
                        "position limit (%(default)s)")
    g.add_argument("--on-overflow", choices=("truncate", "error"), default=d.overflow,
                   help="longer examples: keep their first max_length-2 k-mers (a warning counts "
                        "them) or stop with an error naming the line (%(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="examples per prediction batch (%(default)s)")
    g.add_argument("--eval-steps", type=int, default=None,
                   help="with a dev set: evaluate it every N optimizer steps (default: each epoch)")
    g.add_argument("--last-weights", action="store_true",
                   help="with a dev set: test the final weights instead of those of lowest "
                        "dev loss")
    g.add_argument("--device", default=d.device,
                   help="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N' (%(default)s)")


def add_run_options(p: argparse.ArgumentParser, default_seed: int) -> None:
    g = p.add_argument_group("runs and results")
    g.add_argument("--runs", type=int, default=10,
                   help="seeded runs per task, reported as mean and std; run r uses seed+r "
                        "(%(default)s, the reference protocol)")
    g.add_argument("--seed", type=int, default=default_seed, help="first seed (%(default)s)")
    g.add_argument("--runs-root", default="runs",
                   help="directory of the default MLflow store sqlite:///RUNS_ROOT/mlflow.db; "
                        "MLFLOW_TRACKING_URI overrides it (%(default)s)")
    g.add_argument("--experiment", default="cmgems-eval",
                   help="MLflow experiment name (%(default)s)")
    g.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    g.add_argument("-v", "--verbose", action="store_true", help="log every run's metrics")


def config_from_args(args):
    from cmgems.finetune import FinetuneConfig
    return FinetuneConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio,
                          warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                          weight_decay=args.weight_decay, hidden_dropout=args.hidden_dropout,
                          max_length=args.max_length, overflow=args.on_overflow,
                          eval_batch_size=args.eval_batch_size, eval_steps=args.eval_steps,
                          select_best=not args.last_weights, device=args.device)


def tracking_from_args(args):
    if args.no_tracking:
        return None
    from cmgems.finetune import Tracking
    from cmgems.tracking_uri import resolve_tracking_uri
    try:
        return Tracking(resolve_tracking_uri(args.runs_root), args.experiment)
    except OSError as e:  # an unwritable runs root must not stop the evaluation
        logging.getLogger(__name__).warning("MLflow tracking disabled: %s", e)
        return None


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
    add_config_options(p)
    add_run_options(p, default_seed=0)
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
        config = config_from_args(args)
        tracking = tracking_from_args(args)
        if args.task_dir is not None:
            if args.shots is not None:
                raise InputError("--shots applies to --train/--test files only")
            result = finetune_task(args.model_dir, args.task_dir, runs=args.runs,
                                   seed=args.seed, config=config, tracking=tracking,
                                   name=args.name, out_json=args.out)
        else:
            result = fewshot(args.model_dir, args.train, args.test, runs=args.runs,
                             seed=args.seed, shots=args.shots, config=config, tracking=tracking,
                             name=args.name, out_json=args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(json.dumps({"name": result["name"], "runs": len(result["runs"]), "mean": result["mean"],
                      "std": result["std"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
