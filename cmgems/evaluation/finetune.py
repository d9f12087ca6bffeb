"""Finetune an exported model for sequence classification and test it; the few-shot protocol.

A model dir is what pretraining exports (BertForMaskedLM.save_pretrained + vocab.txt, cmgems.json);
k follows from the vocabulary size. Each run loads BertForSequenceClassification from it with a
fresh, seeded head, trains with AdamW (linear warmup, then linear decay to 0) in a plain PyTorch
loop and reports accuracy, macro F1 and MCC on the test file. Everything random in a run (head
init, dropout, shuffling) follows from its seed; which rows a few-shot run trains on follows from
(seed, run) (cmgems.evaluation.shots).

Public API:
    fewshot(model_dir, train_path, test_path, shots=None, pool=None, runs=10, seed=42, ...)
    finetune_task(model_dir, task_dir, runs=1, seed=42, ...)       (GUE-style folder)
    evaluate(info, train, test, ...)                                 (files already loaded)
Each returns {"mean": {metric: v}, "std": {...}, "shots", "pool", "runs": [{"seed", "train_rows",
"metrics", ...}], ...} with metrics "accuracy", "f1" (macro) and "mcc"; logs to MLflow when given
a Tracking (cmgems.evaluation.tracking); writes the dict to out_json and the test predictions beside it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.precision import auto_precision, torch_dtype
from cmgems.evaluation.progress import RunProgress
from cmgems.evaluation.report import predictions_path, write_predictions
from cmgems.evaluation.tracking import Tracking, finish_task_run, log_run, start_task_run
from cmgems.io import atomic_path
from cmgems.evaluation.metrics import classification_metrics, summarize
from cmgems.options import DEFAULT_SEED, add_arguments, option
from cmgems.evaluation.shots import ShotPool, class_counts, shot_pool
from cmgems.evaluation.tasks import OVERFLOW_MODES, TaskData, check_labels, load_task_file, num_labels
from cmgems.data.tokens import PAD_ID, k_from_vocab_size
from cmgems.tracking.uri import resolve_tracking_uri

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# Files of an export that are the model itself; everything else (vocabulary, tokenizer files and
# code) goes with a saved classifier so that it loads the way the export does.
_MODEL_FILES = ("config.json", "generation_config.json", "README.md", "cmgems.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")

__all__ = ["FinetuneConfig", "EvalRuns", "Tracking", "ModelInfo", "model_info", "evaluate",
           "fewshot", "finetune_task", "load_task_dir", "train_and_test", "predict"]


@dataclass
class FinetuneConfig:
    """Finetuning hyperparameters; the defaults are GeneMask's few-shot reference settings."""

    lr: float = option(1e-4, "Peak learning rate of AdamW.")
    epochs: int = option(20, "Passes over the training set (ignored when max_steps is set).")
    batch_size: int = option(5, "Examples per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step (examples per step: "
                             "batch_size x grad_accum).")
    warmup_ratio: float = option(0.1, "Linear warmup as a fraction of all optimizer steps, then "
                                 "linear decay to 0.")
    warmup_steps: int | None = option(None, "Absolute warmup steps; overrides warmup_ratio.")
    max_steps: int | None = option(None, "Total optimizer steps; overrides epochs.")
    weight_decay: float = option(0.01, "AdamW weight decay, not applied to biases and LayerNorm "
                                 "weights.")
    max_grad_norm: float = option(1.0, "Gradient norm clipping (Hugging Face Trainer's default).")
    hidden_dropout: float = option(0.1, "Hidden dropout of the classification model.")
    max_length: int = option(512, "Tokens per example including [CLS] and [SEP], capped at the "
                             "model's position limit.")
    overflow: str = option("truncate", "Longer examples: keep their first max_length-2 k-mers (a "
                           "warning counts them) or stop with an error naming the line.",
                           flag="--on-overflow", choices=OVERFLOW_MODES)
    eval_batch_size: int = option(64, "Examples per prediction batch.")
    eval_steps: int | None = option(None, "With a dev set: evaluate it every N optimizer steps "
                                    "(unset: at the end of each epoch).")
    select_best: bool = option(True, "With a dev set: test the weights of lowest dev loss "
                               "(off: the final weights).")
    precision: str = option("fp32", "Autocast precision of forward passes: fp32, bf16, fp16 "
                            "(with loss scaling), or auto (bf16 on a GPU that has it, else fp32, "
                            "as pretraining's auto).", choices=PRECISIONS)
    device: str = option("auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'.")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"finetune config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_steps", "eval_steps"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "warmup_steps" else 1):
                raise InputError(f"finetune config: {name} must be positive, got {v}")
        if not self.lr > 0:
            raise InputError(f"finetune config: lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"finetune config: warmup_ratio must be in [0, 1), "
                             f"got {self.warmup_ratio}")
        if not 0 <= self.hidden_dropout < 1:
            raise InputError(f"finetune config: hidden_dropout must be in [0, 1), "
                             f"got {self.hidden_dropout}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise InputError("finetune config: weight_decay must be >= 0 and max_grad_norm > 0")
        if self.max_length < 3:
            raise InputError(f"finetune config: max_length must be >= 3, got {self.max_length}")
        if self.overflow not in OVERFLOW_MODES:
            raise InputError(f"finetune config: overflow must be one of {OVERFLOW_MODES}, "
                             f"got {self.overflow!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"finetune config: precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


@dataclass
class EvalRuns:
    """How often a task is finetuned and where the results are tracked (both evaluation
    launchers' "runs and results" options)."""

    runs: int = option(10, "Seeded runs per task, reported as mean and std; run r uses seed+r "
                       "(10: the reference protocol).")
    seed: int = option(DEFAULT_SEED, "First seed.")
    runs_root: str = option("runs", "Directory of the default MLflow store "
                            "sqlite:///RUNS_ROOT/mlflow.db; MLFLOW_TRACKING_URI overrides it.")
    experiment: str = option("cmgems-eval", "MLflow experiment name.")
    tracking: bool = option(True, "Log the results to MLflow.")

    def __post_init__(self):
        if self.runs < 1:
            raise InputError(f"runs must be >= 1, got {self.runs}")

    def tracking_target(self) -> Tracking | None:
        """The store to log to; None with tracking off, or (with a warning) when the default
        store cannot be created: an unwritable runs root must not stop the evaluation."""
        if not self.tracking:
            return None
        try:
            return Tracking(resolve_tracking_uri(self.runs_root), self.experiment)
        except OSError as e:
            log.warning("MLflow tracking disabled: %s", e)
            return None

    @staticmethod
    def add_arguments(parser, defaults: dict | None = None):
        """The evaluation launchers' "runs and results" options, -v/--verbose among them."""
        group = add_arguments(parser, EvalRuns, title="runs and results", defaults=defaults)
        group.add_argument("-v", "--verbose", action="store_true", help="log every run's metrics")
        return group

    @staticmethod
    def configure_logging(verbose: bool) -> None:
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")


@dataclass
class ModelInfo:
    path: Path
    k: int
    max_positions: int
    meta: dict = dataclasses.field(default_factory=dict)  # the export's cmgems.json, if any

    @property
    def pretrain_run_id(self) -> str | None:
        """The MLflow run that pretrained this model (recorded by the export)."""
        return self.meta.get("mlflow_run_id") or None


def model_info(model_dir: str | Path) -> ModelInfo:
    """Check an exported model dir (config.json, vocab.txt) and read k, its position limit and
    the export's cmgems.json."""
    d = Path(model_dir)
    cfg_path, vocab_path, meta_path = d / "config.json", d / "vocab.txt", d / "cmgems.json"
    if not cfg_path.is_file():
        raise InputError(f"{cfg_path}: no such file (model dir must hold a save_pretrained model)")
    try:
        cfg = json.loads(cfg_path.read_text())
        size, positions = int(cfg["vocab_size"]), int(cfg["max_position_embeddings"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{cfg_path}: not a BERT config ({e})") from None
    try:
        k = k_from_vocab_size(size)
    except ValueError as e:
        raise InputError(f"{cfg_path}, field vocab_size: {e}") from None
    if not vocab_path.is_file():
        raise InputError(f"{vocab_path}: no such file (written by cmgems.data.tokens.write_vocab)")
    n_vocab = len(vocab_path.read_text().split())
    if n_vocab != size:
        raise InputError(f"{vocab_path}: {n_vocab} tokens, config.json says vocab_size {size}")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise InputError(f"{meta_path}: not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object")
    return ModelInfo(d, k, positions, meta)


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device) -> str:
    """'auto' as pretraining resolves it (cmgems.precision); an explicit one as given (torch
    autocast runs bf16 and fp16 on every device)."""
    return auto_precision(device) if precision == "auto" else precision


def _autocast(device, precision: str):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(precision))


def _batches(data: TaskData, order: np.ndarray, size: int):
    import torch
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        width = int(data.lengths[idx].max())
        ids = torch.from_numpy(data.input_ids[idx, :width]).long()
        yield ids, ids != PAD_ID, torch.from_numpy(data.labels[idx])


def predict(model, data: TaskData, batch_size: int, device,
            precision: str = "fp32") -> tuple[np.ndarray, float]:
    """(predicted labels, mean cross-entropy) of a model over a task file, in file order."""
    import torch
    # Length-sorted batches pad less; predictions are put back in file order.
    order = np.argsort(data.lengths, kind="stable")
    preds = np.empty(len(data), dtype=np.int64)
    loss_sum = 0.0
    model.eval()
    with torch.no_grad():
        pos = 0
        for ids, mask, labels in _batches(data, order, batch_size):
            with _autocast(device, precision):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            labels=labels.to(device))
            n = len(labels)
            preds[order[pos:pos + n]] = out.logits.argmax(-1).cpu().numpy()
            loss_sum += float(out.loss) * n
            pos += n
    return preds, loss_sum / len(data)


def _load_classifier(info: ModelInfo, classes: int, hidden_dropout: float):
    """BertForSequenceClassification with a new head; transformers' per-load report (the MLM head
    dropped, classifier new: expected every time) and progress bar are silenced for the call."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging
    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(
            str(info.path), num_labels=classes, hidden_dropout_prob=hidden_dropout)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _optimizer(model, config: FinetuneConfig):
    import torch
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def save_classifier(model, info: ModelInfo, out_dir: Path, meta: dict) -> None:
    """save_pretrained of the finetuned model, the export's vocabulary and tokenizer files beside
    it, and cmgems.json saying what it was finetuned from and on."""
    model.save_pretrained(out_dir)
    for f in sorted(info.path.iterdir()):
        if f.is_file() and f.name not in _MODEL_FILES and f.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "cmgems.json").write_text(json.dumps(
        {"k": info.k, "finetuned_from": str(info.path.resolve()), "base": info.meta, **meta},
        indent=2) + "\n")


def train_and_test(info: ModelInfo, train: TaskData, test: TaskData, classes: int,
                   config: FinetuneConfig, seed: int, dev: TaskData | None = None,
                   on_epoch=None, save_dir: Path | None = None) -> tuple[dict, np.ndarray]:
    """One finetuning run: ({"seed", "metrics" (test), "test_loss", "dev_metrics", "steps",
    "train_loss", "precision"}, test predictions). on_epoch(epoch, epochs, mean loss) is called
    after each pass; with save_dir the tested model is saved there."""
    import torch

    device = _device(config.device)
    precision = resolve_precision(config.precision, device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        # Seeding the global generator fixes head init and dropout without touching the caller's
        # random state (fork_rng restores it).
        torch.manual_seed(seed)
        model = _load_classifier(info, classes, config.hidden_dropout).to(device)
        shuffle = torch.Generator().manual_seed(seed)
        micro_per_epoch = math.ceil(len(train) / config.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
        total = config.max_steps or steps_per_epoch * config.epochs
        epochs = math.ceil(total / steps_per_epoch)
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else math.ceil(config.warmup_ratio * total))
        opt = _optimizer(model, config)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / max(1, warmup) if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup)))
        # fp16 needs loss scaling against underflowing gradients; bf16 has fp32's range.
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        eval_every = config.eval_steps or steps_per_epoch
        best = (math.inf, None, None)  # dev loss, weights, dev metrics
        step, epoch, losses = 0, 0, []
        while step < total:
            model.train()
            epoch += 1
            order = torch.randperm(len(train), generator=shuffle).numpy()
            for i, (ids, mask, labels) in enumerate(_batches(train, order, config.batch_size)):
                with _autocast(device, precision):
                    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                labels=labels.to(device))
                loss = out.loss / config.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                losses.append(float(out.loss.detach()))
                if (i + 1) % config.grad_accum and i + 1 != micro_per_epoch:
                    continue
                if scaler:
                    scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if dev is not None and (step % eval_every == 0 or step == total):
                    preds, dev_loss = predict(model, dev, config.eval_batch_size, device,
                                              precision)
                    if dev_loss < best[0] or not config.select_best:
                        weights = (copy.deepcopy(model.state_dict()) if config.select_best
                                   else None)
                        best = (dev_loss, weights,
                                dict(classification_metrics(dev.labels, preds), loss=dev_loss))
                    model.train()
                if step >= total:
                    break
            if on_epoch is not None:
                on_epoch(epoch, epochs, float(np.mean(losses[-micro_per_epoch:])))
        if best[1] is not None:
            model.load_state_dict(best[1])
        preds, test_loss = predict(model, test, config.eval_batch_size, device, precision)
        metrics = classification_metrics(test.labels, preds)
        if save_dir is not None:
            save_classifier(model, info, save_dir, {"seed": seed, "test_metrics": metrics})
    tail = losses[-micro_per_epoch:]
    return ({"seed": seed, "metrics": metrics, "test_loss": test_loss, "dev_metrics": best[2],
             "steps": step, "train_loss": float(np.mean(tail)) if tail else math.nan,
             "precision": precision}, preds)


def _save_dirs(save_model: str | Path | None, runs: int) -> tuple[Path | None, list]:
    """(staging folder, per-run folders inside it) for --save-model DIR: DIR itself for one run,
    DIR/run-<r> for several. Checked before any training: an existing non-empty DIR is refused."""
    if save_model is None:
        return None, [None] * runs
    final = Path(save_model)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InputError(f"--save-model {final}: exists and is not an empty folder; name a new one")
    staging = final.with_name(final.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted earlier run of this command
    dirs = [staging] if runs == 1 else [staging / f"run-{r}" for r in range(runs)]
    return staging, dirs


def _pool_summary(train: TaskData, classes: int, pool: ShotPool | None) -> dict:
    if pool is not None:
        return pool.describe()
    return {"path": str(train.path), "size": len(train),
            "per_class": class_counts(train.labels, classes).tolist(), "shots": "all",
            "draw": "the whole file in every run"}


def evaluate(info: ModelInfo, train: TaskData, test: TaskData, *, dev: TaskData | None = None,
             runs: int = 1, seed: int = DEFAULT_SEED, pool: ShotPool | None = None,
             config: FinetuneConfig, tracking: Tracking | None = None, name: str = "task",
             out_json: str | Path | None = None, save_model: str | Path | None = None,
             progress: bool = False, params_extra: dict | None = None) -> dict:
    """R seeded runs (run r: seed + r) on already loaded files. With a pool (a ShotPool over
    `train`'s labels), run r trains on pool.rows(seed, r); without, on all of `train`."""
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    classes = num_labels(train)
    for d in (dev, test):
        if d is not None:
            check_labels(d, classes, train.path)
    if pool is not None and pool.single_draw and runs > 1:
        log.warning("%s holds exactly %d examples of every class: all %d runs train on the same "
                    "%d rows and differ only in seed; give a larger pool to draw from",
                    pool.path, pool.shots, runs, pool.size)
    staging, save_dirs = _save_dirs(save_model, runs)
    pool_info = _pool_summary(train, classes, pool)
    params = {"model_dir": str(info.path), "k": info.k, "train": str(train.path),
              "test": str(test.path), "dev": str(dev.path) if dev else "", "runs": runs,
              "seed": seed, "shots": pool_info["shots"], "pool_size": pool_info["size"],
              "draw": pool_info["draw"], "num_labels": classes,
              "pretrain_run_id": info.pretrain_run_id or "", **(params_extra or {}),
              **dataclasses.asdict(config)}
    parent = start_task_run(tracking, name, params, info)
    results, preds = [], []
    bar = RunProgress(name, runs, enabled=progress)
    try:
        for r in range(runs):
            rows = pool.rows(seed, r) if pool is not None else None
            res, run_preds = train_and_test(
                info, train if rows is None else train.subset(rows), test, classes, config,
                seed + r, dev, on_epoch=lambda e, n, loss: bar.epoch(r, e, n, loss),
                save_dir=save_dirs[r])
            res = {"run": r, **res,
                   "train_rows": rows.tolist() if rows is not None else "all"}
            results.append(res)
            preds.append(run_preds)
            log_run(parent, name, res, 0 if rows is None else len(rows))
            bar.run_done(r, res)
        summary = summarize([r["metrics"] for r in results])
    except BaseException as e:
        finish_task_run(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        bar.close()
    if staging is not None:
        staging.rename(save_model)
        parent.set_tag("cmgems.saved_model", str(Path(save_model).resolve()))
    out = {"name": name, **summary, "shots": pool_info["shots"], "pool": pool_info,
           "test": {"path": str(test.path), "size": len(test)}, "runs": results,
           "params": params,
           "truncated": {"train": train.truncated, "test": test.truncated,
                         "dev": dev.truncated if dev else 0},
           "saved_model": str(save_model) if save_model is not None else None,
           "predictions": None, "mlflow_run_id": parent.run_id}
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(out_json) if out_json is not None else Path(tmp) / "result.json"
        if out_json is not None or parent.run_id is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            pred_path = predictions_path(json_path)
            write_predictions(pred_path, test, preds)
            if out_json is not None:
                out["predictions"] = str(pred_path)
            with atomic_path(json_path) as t:
                t.write_text(json.dumps(out, indent=2) + "\n")
            finish_task_run(parent, "FINISHED", json_path, pred_path, summary)
    return out


def effective_max_length(info: ModelInfo, config: FinetuneConfig) -> int:
    """config.max_length, capped (with a warning) at the model's position embeddings."""
    if config.max_length > info.max_positions:
        log.warning("max_length %d exceeds the model's %d positions: using %d", config.max_length,
                    info.max_positions, info.max_positions)
    return min(config.max_length, info.max_positions)


def fewshot(model_dir: str | Path, train_path: str | Path | None, test_path: str | Path, *,
            shots: int | None = None, pool: str | Path | None = None, runs: int = 10,
            seed: int = DEFAULT_SEED, config: FinetuneConfig | None = None,
            tracking: Tracking | None = None, name: str | None = None,
            out_json: str | Path | None = None, save_model: str | Path | None = None,
            progress: bool = False) -> dict:
    """GeneMask's few-shot protocol: `runs` seeded finetunings (no validation set), run r on its
    own draw of n examples per class from the training pool (cmgems.evaluation.shots), each tested on
    test_path; mean and std of accuracy, macro F1, MCC.

    The pool is `pool` when given, else train_path. n is `shots`, or else inferred from
    train_path (else the pool), which must then hold exactly n examples of every class. Files:
    .tsv (few-shot k-mer text) or .csv (GUE sequence,label).
    """
    if train_path is None and pool is None:
        raise InputError("few-shot evaluation needs a training file or a pool")
    config = config or FinetuneConfig()
    info = model_info(model_dir)
    length = effective_max_length(info, config)
    pool_path = Path(pool if pool is not None else train_path)
    data = load_task_file(pool_path, info.k, length, config.overflow)
    test = load_task_file(test_path, info.k, length, config.overflow)
    classes = num_labels(data)
    shot_file = None
    if train_path is not None and Path(train_path) != pool_path:
        # Read and checked even when --shots makes it unneeded: a named input is never ignored.
        train = load_task_file(train_path, info.k, length, config.overflow)
        check_labels(train, classes, pool_path)
        shot_file = (train.path, train.labels)
    plan = shot_pool(pool_path, data.labels, classes, shots, shot_file)
    named = Path(train_path) if train_path is not None else pool_path
    name = name or f"{named.parent.name}/{named.stem}"
    return evaluate(info, data, test, runs=runs, seed=seed, pool=plan, config=config,
                    tracking=tracking, name=name, out_json=out_json, save_model=save_model,
                    progress=progress,
                    params_extra={"shot_file": str(train_path) if train_path else ""})


def finetune_task(model_dir: str | Path, task_dir: str | Path, *, runs: int = 1,
                  seed: int = DEFAULT_SEED,
                  config: FinetuneConfig | None = None, tracking: Tracking | None = None,
                  name: str | None = None, out_json: str | Path | None = None,
                  save_model: str | Path | None = None, progress: bool = False) -> dict:
    """Finetune on task_dir/train.csv, select on dev.csv (if present), test on test.csv."""
    config = config or FinetuneConfig()
    info = model_info(model_dir)
    train, dev, test = load_task_dir(info, task_dir, config)
    return evaluate(info, train, test, dev=dev, runs=runs, seed=seed, config=config,
                    tracking=tracking, name=name or Path(task_dir).name, out_json=out_json,
                    save_model=save_model, progress=progress)


def load_task_dir(info: ModelInfo, task_dir: str | Path,
                  config: FinetuneConfig) -> tuple[TaskData, TaskData | None, TaskData]:
    """(train, dev or None, test) of a GUE-style folder, tokenized for the model."""
    length = effective_max_length(info, config)
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise InputError(f"{task_dir}: task folder does not exist")
    train = load_task_file(task_dir / "train.csv", info.k, length, config.overflow)
    test = load_task_file(task_dir / "test.csv", info.k, length, config.overflow)
    dev_path = task_dir / "dev.csv"
    dev = load_task_file(dev_path, info.k, length, config.overflow) if dev_path.is_file() else None
    return train, dev, test
