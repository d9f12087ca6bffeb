"""Finetune an exported model for sequence classification and test it; the few-shot protocol.

A model dir is what pretraining exports (BertForMaskedLM.save_pretrained + vocab.txt); k follows
from the vocabulary size. Each run loads BertForSequenceClassification from it with a fresh,
seeded head, trains with AdamW (linear warmup, then linear decay to 0) in a plain PyTorch loop and
reports accuracy, macro F1 and MCC on the test file. Everything random in a run (head init,
dropout, shuffling) follows from its seed.

Public API:
    fewshot(model_dir, train_path, test_path, runs=10, seed=42, ...) -> dict  (GeneMask protocol)
    finetune_task(model_dir, task_dir, runs=1, seed=42, ...) -> dict         (GUE-style folder)
Both return {"mean": {metric: v}, "std": {...}, "runs": [{"seed", "block", "metrics", ...}], ...}
with metrics "accuracy", "f1" (macro) and "mcc", log to MLflow (cmgems.tracking.Tracker) when given
a Tracking and write the dict to out_json when given one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import DEFAULT_SEED, option
from .errors import InputError
from .io import atomic_path
from .metrics import classification_metrics, summarize
from .tasks import OVERFLOW_MODES, TaskData, check_labels, load_task_file, num_labels, shot_blocks
from .tokens import PAD_ID, k_from_vocab_size
from .tracking import Tracker
from .tracking_uri import resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Finetuning hyperparameters; the defaults are GeneMask's few-shot reference settings."""

    lr: float = option(1e-4, "Peak learning rate of AdamW.")
    epochs: int = option(20, "Passes over the training set (ignored when max_steps is set).")
    batch_size: int = option(5, "Examples per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
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


@dataclass
class Tracking:
    """Where results go in MLflow: one parent run per task, one child run per seed."""

    uri: str  # tracking URI, e.g. cmgems.tracking_uri.resolve_tracking_uri(runs_root)
    experiment: str = "cmgems-eval"  # experiment name, created when missing


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


@dataclass
class ModelInfo:
    path: Path
    k: int
    max_positions: int


def model_info(model_dir: str | Path) -> ModelInfo:
    """Check an exported model dir (config.json, vocab.txt) and read k and its position limit."""
    d = Path(model_dir)
    cfg_path, vocab_path = d / "config.json", d / "vocab.txt"
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
        raise InputError(f"{vocab_path}: no such file (written by cmgems.tokens.write_vocab)")
    n_vocab = len(vocab_path.read_text().split())
    if n_vocab != size:
        raise InputError(f"{vocab_path}: {n_vocab} tokens, config.json says vocab_size {size}")
    return ModelInfo(d, k, positions)


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(data: TaskData, order: np.ndarray, size: int):
    import torch
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        width = int(data.lengths[idx].max())
        ids = torch.from_numpy(data.input_ids[idx, :width]).long()
        yield ids, ids != PAD_ID, torch.from_numpy(data.labels[idx])


def predict(model, data: TaskData, batch_size: int, device) -> tuple[np.ndarray, float]:
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


def train_and_test(info: ModelInfo, train: TaskData, test: TaskData, classes: int,
                   config: FinetuneConfig, seed: int, dev: TaskData | None = None) -> dict:
    """One finetuning run: {"seed", "metrics" (test), "dev_metrics", "steps", "train_loss"}."""
    import torch

    device = _device(config.device)
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
        warmup = (config.warmup_steps if config.warmup_steps is not None
                  else math.ceil(config.warmup_ratio * total))
        opt = _optimizer(model, config)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / max(1, warmup) if s < warmup
            else max(0.0, (total - s) / max(1, total - warmup)))
        eval_every = config.eval_steps or steps_per_epoch
        best = (math.inf, None, None)  # dev loss, weights, dev metrics
        step, losses = 0, []
        while step < total:
            model.train()
            order = torch.randperm(len(train), generator=shuffle).numpy()
            for i, (ids, mask, labels) in enumerate(_batches(train, order, config.batch_size)):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            labels=labels.to(device))
                (out.loss / config.grad_accum).backward()
                losses.append(float(out.loss.detach()))
                if (i + 1) % config.grad_accum and i + 1 != micro_per_epoch:
                    continue
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if dev is not None and (step % eval_every == 0 or step == total):
                    preds, dev_loss = predict(model, dev, config.eval_batch_size, device)
                    if dev_loss < best[0] or not config.select_best:
                        weights = (copy.deepcopy(model.state_dict()) if config.select_best
                                   else None)
                        best = (dev_loss, weights,
                                dict(classification_metrics(dev.labels, preds), loss=dev_loss))
                    model.train()
                if step >= total:
                    break
        if best[1] is not None:
            model.load_state_dict(best[1])
        preds, test_loss = predict(model, test, config.eval_batch_size, device)
    tail = losses[-micro_per_epoch:]
    return {"seed": seed, "metrics": classification_metrics(test.labels, preds),
            "test_loss": test_loss, "dev_metrics": best[2], "steps": step,
            "train_loss": float(np.mean(tail)) if tail else math.nan}


def _flat(prefix: str, metrics: dict | None) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in (metrics or {}).items()}


def _finite(values: dict) -> dict[str, float]:
    """What MLflow is sent: a metric that does not exist (no dev set) or is not finite is left
    out."""
    return {k: v for k, v in values.items() if v is not None and np.isfinite(v)}


def _parent_run(tracking: Tracking | None, name: str, params: dict) -> Tracker:
    """The task's MLflow run. If it cannot be created, tracking is off for the whole task (its
    seeds' runs would have no parent); the results still come back and go to the JSON file."""
    if tracking is None:
        return Tracker(False)
    parent = Tracker(True, tracking.uri, tracking.experiment, name)
    if parent.run_id is None:
        log.warning("MLflow tracking disabled after an error: the run of %s could not be "
                    "created in %s", name, tracking.uri)
        return Tracker(False)
    parent.log_params(params)
    return parent


def evaluate(info: ModelInfo, train: TaskData, test: TaskData, *, dev: TaskData | None = None,
             runs: int = 1, seed: int = DEFAULT_SEED, shots: int | None = None,
             config: FinetuneConfig, tracking: Tracking | None = None, name: str = "task",
             out_json: str | Path | None = None) -> dict:
    """R seeded runs (run r: seed + r, shot block r mod blocks) on already loaded files."""
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    classes = num_labels(train)
    for d in (dev, test):
        if d is not None:
            check_labels(d, classes, train.path)
    blocks = shot_blocks(train, classes, shots)
    params = {"model_dir": str(info.path), "k": info.k, "train": str(train.path),
              "test": str(test.path), "dev": str(dev.path) if dev else "", "runs": runs,
              "seed": seed, "shots": shots if shots is not None else "all", "blocks": len(blocks),
              "num_labels": classes, **dataclasses.asdict(config)}
    parent = _parent_run(tracking, name, params)
    results, status = [], "FAILED"
    try:
        for r in range(runs):
            b = r % len(blocks)
            res = train_and_test(info, train.subset(blocks[b]), test, classes, config, seed + r, dev)
            res.update(run=r, block=b)
            results.append(res)
            child = parent.child(f"{name}/seed{seed + r}")
            child.log_params({"seed": seed + r, "block": b, "run": r})
            child.log_metrics(_finite({**_flat("test_", res["metrics"]),
                                       "test_loss": res["test_loss"],
                                       **_flat("dev_", res["dev_metrics"]),
                                       "train_loss": res["train_loss"], "steps": res["steps"]}), 0)
            child.finish()
            log.info("%s run %d/%d seed %d: %s", name, r + 1, runs, seed + r, res["metrics"])
        summary = summarize([r["metrics"] for r in results])
        parent.log_metrics(_finite({**_flat("test_mean_", summary["mean"]),
                                    **_flat("test_std_", summary["std"])}), 0)
        status = "FINISHED"
    finally:
        parent.finish(status)
    out = {"name": name, **summary, "runs": results, "params": params,
           "truncated": {"train": train.truncated, "test": test.truncated,
                         "dev": dev.truncated if dev else 0},
           "mlflow_run_id": parent.run_id}
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_json) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
    return out


def effective_max_length(info: ModelInfo, config: FinetuneConfig) -> int:
    """config.max_length, capped (with a warning) at the model's position embeddings."""
    if config.max_length > info.max_positions:
        log.warning("max_length %d exceeds the model's %d positions: using %d", config.max_length,
                    info.max_positions, info.max_positions)
    return min(config.max_length, info.max_positions)


def fewshot(model_dir: str | Path, train_path: str | Path, test_path: str | Path, *,
            runs: int = 10, seed: int = DEFAULT_SEED, shots: int | None = None,
            config: FinetuneConfig | None = None, tracking: Tracking | None = None,
            name: str | None = None, out_json: str | Path | None = None) -> dict:
    """GeneMask's few-shot protocol: `runs` seeded finetunings on n examples per class (no
    validation set), each tested on test_path; mean and std of accuracy, macro F1, MCC.

    train_path/test_path: .tsv (few-shot k-mer text) or .csv (GUE sequence,label). With `shots`,
    the training file is read as consecutive blocks of `shots` examples per class, run r using
    block r mod (number of blocks); without it the whole file is every run's training set.
    """
    config = config or FinetuneConfig()
    info = model_info(model_dir)
    length = effective_max_length(info, config)
    train = load_task_file(train_path, info.k, length, config.overflow)
    test = load_task_file(test_path, info.k, length, config.overflow)
    name = name or f"{Path(train_path).parent.name}/{Path(train_path).stem}"
    return evaluate(info, train, test, runs=runs, seed=seed, shots=shots, config=config,
                    tracking=tracking, name=name, out_json=out_json)


def finetune_task(model_dir: str | Path, task_dir: str | Path, *, runs: int = 1,
                  seed: int = DEFAULT_SEED,
                  config: FinetuneConfig | None = None, tracking: Tracking | None = None,
                  name: str | None = None, out_json: str | Path | None = None) -> dict:
    """Finetune on task_dir/train.csv, select on dev.csv (if present), test on test.csv."""
    config = config or FinetuneConfig()
    info = model_info(model_dir)
    train, dev, test = load_task_dir(info, task_dir, config)
    return evaluate(info, train, test, dev=dev, runs=runs, seed=seed, config=config,
                    tracking=tracking, name=name or Path(task_dir).name, out_json=out_json)


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
