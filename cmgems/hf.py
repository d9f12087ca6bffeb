"""CM-GEMS inside a transformers Trainer: the masking as a data collator, the curriculum as a
TrainerCallback (docs/hf.md).

    collator = MaskingCollator.for_dataset(DATA_DIR, mode="cm_gems")
    trainer = Trainer(model=model, args=TrainingArguments(..., eval_strategy="steps"),
                      train_dataset=ShardDataset(DATA_DIR, "train"),
                      eval_dataset=collator.frozen(ShardDataset(DATA_DIR, "valid")),
                      data_collator=collator, callbacks=[CurriculumCallback(collator)])

Features are {"input_ids": [CLS] k-mer ids [SEP]}: ShardDataset's, or cmgems.tokenizer's output
for raw sequences, with the NPMI table the collator was made with (npmi_table.load_table). NPMI
comes from the ids by table lookup, rounded to float16 as the shards store it, so no extra column
has to survive the Trainer's column removal. Masking is cmgems.masking's mask_batch; which
strategies a batch gets is cmgems.curriculum's schedule.

The callback decides in the training process; the collator may run in DataLoader workers. The
decision reaches them through shared memory, so a switch takes effect at the next batch collated
after it: late by the batches already prefetched (one with num_workers=0, as accelerate looks one
batch ahead; about num_workers x prefetch_factor more with workers).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from cmgems.masking.curriculum import make_schedule
from cmgems.data.layout import DatasetDir
from cmgems.pretrain.layout import RunLayout
from cmgems.data.loader import SampleDataset
from cmgems.errors import InputError
from cmgems.masking.maskings import IGNORE_INDEX, mask_batch
from cmgems.masking.names import (CM_GEMS, DEFAULT_PROBABILITY, check_masking, check_pmi_lookup,
                                  parse_mode)
from cmgems.data.npmi_table import load_table, npmi_of_ids
from cmgems.rng import generator
from cmgems.data.shards import Manifest, ShardSet
from cmgems.data.tokens import CLS_ID, K_RANGE, NUM_SPECIAL, PAD_ID, SEP_ID

# Under transformers' logger, so its handler and verbosity (TrainingArguments.log_level) apply as
# to the Trainer's own lines: a plain Trainer script shows the switch, as it shows warnings.
log = hf_logging.get_logger("transformers.cmgems")

_STEP, _STAGE, _MAX_STEPS = range(3)  # slots of the collator's shared state


class ShardDataset(torch.utils.data.Dataset):
    """The samples of one split of a cmgems dataset as Trainer features: {"input_ids": [CLS]
    tokens [SEP]}, cut to max_length tokens."""

    def __init__(self, data_dir: str | Path, split: str = "train", max_length: int = 512):
        self.samples = SampleDataset(ShardSet(data_dir, split), max_length)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tokens, _ = self.samples[i]
        return {"input_ids": np.concatenate(([CLS_ID], tokens.astype(np.int64), [SEP_ID]))}


class MaskingCollator:
    """Pads features and masks them as the curriculum's current stage says: {"input_ids",
    "attention_mask", "labels"} for a masked language model.

    npmi_table: NPMI per k-mer code (float [4^k], NaN = unscored; k follows from its length).
    mode: fixed:<strategy>, cm_step or cm_gems (cmgems.masking.curriculum). pmi_lookup: "token"
    or "position" (cmgems.masking.maskings.select). Features that bring their own
    "labels" (collator.frozen's) are only padded. Batch b of a process is masked with generator
    (seed, b, DataLoader worker id): a run repeats exactly for the same seed and num_workers.
    """

    def __init__(self, npmi_table, mode: str = CM_GEMS,
                 probabilities: dict[str, float] | None = None, seed: int = 0,
                 pmi_lookup: str = "token"):
        table = np.asarray(npmi_table, dtype=np.float64)
        k = next((k for k in K_RANGE if 4 ** k == len(table)), None)
        if k is None:
            raise InputError(f"NPMI table of {len(table)} values: not 4^k for k in 3..6")
        self.k, self.vocab_size = k, NUM_SPECIAL + 4 ** k
        self.table = torch.from_numpy(table.astype(np.float16).astype(np.float32))
        self.mode = parse_mode(mode).name
        self.probabilities = dict(DEFAULT_PROBABILITY)
        for name, p in (probabilities or {}).items():
            self.probabilities[check_masking(name)] = float(p)
        self.seed = seed
        self.pmi_lookup = check_pmi_lookup(pmi_lookup)
        self.batches = 0
        # [step, stage index, max_steps]: set by the callback, read by every worker's copy
        self.shared = torch.zeros(3, dtype=torch.int64).share_memory_()

    @classmethod
    def for_dataset(cls, data_dir: str | Path, mode: str = CM_GEMS, **kwargs):
        """A collator with the NPMI table of a cmgems dataset (its npmi.tsv)."""
        manifest = Manifest.load(data_dir)
        return cls(load_table(DatasetDir(data_dir).npmi_table, manifest.k), mode, **kwargs)

    # ---------------------------------------------------------------- the curriculum's state
    @property
    def stage_index(self) -> int:
        return int(self.shared[_STAGE])

    def set_stage(self, index: int) -> None:
        self.shared[_STAGE] = int(index)

    def set_step(self, step: int, max_steps: int | None = None) -> None:
        self.shared[_STEP] = int(step)
        if max_steps is not None:
            self.shared[_MAX_STEPS] = int(max_steps)

    def strategies(self, batch: int, gen: torch.Generator) -> list[str]:
        """The masking of each sample of a batch: the mode's schedule at the step and stage the
        callback set."""
        step, max_steps = int(self.shared[_STEP]), int(self.shared[_MAX_STEPS])
        schedule = make_schedule(self.mode, max(max_steps, step + 1))
        return schedule.strategies(step, batch, gen, stage_index=self.stage_index)

    # ---------------------------------------------------------------- batches
    def _pad(self, features: list[dict], key: str, value: int) -> torch.Tensor:
        return pad_sequence([torch.as_tensor(np.asarray(f[key]), dtype=torch.long)
                             for f in features], batch_first=True, padding_value=value)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = self._pad(features, "input_ids", PAD_ID)
        attention = (ids != PAD_ID).long()
        if "labels" in features[0]:
            return {"input_ids": ids, "attention_mask": attention,
                    "labels": self._pad(features, "labels", IGNORE_INDEX)}
        worker = torch.utils.data.get_worker_info()
        gen = generator(self.seed, self.batches, worker.id if worker else 0, "hf-mask")
        self.batches += 1
        inputs, labels, _ = mask_batch(ids, npmi_of_ids(self.table, ids), attention,
                                       self.strategies(ids.shape[0], gen), self.vocab_size, gen,
                                       k=self.k, probabilities=self.probabilities,
                                       pmi_lookup=self.pmi_lookup, npmi_table=self.table)
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}

    def frozen(self, dataset, strategy: str | None = None, batch_size: int = 64) -> list[dict]:
        """The evaluation set masked once (the mode's first stage unless `strategy`), as features
        with their own labels: every evaluation predicts the same positions, so perplexity moves
        with the model only, as the curriculum's decision needs."""
        strategy = check_masking(strategy or parse_mode(self.mode).first_masking)
        out = []
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            ids = self._pad(features, "input_ids", PAD_ID)
            attention = ids != PAD_ID
            gen = generator(self.seed, start // batch_size, 0, "hf-eval")
            inputs, labels, _ = mask_batch(ids, npmi_of_ids(self.table, ids), attention,
                                           strategy, self.vocab_size, gen, k=self.k,
                                           probabilities=self.probabilities,
                                           pmi_lookup=self.pmi_lookup, npmi_table=self.table)
            for row, n in enumerate(attention.sum(1).tolist()):
                out.append({"input_ids": inputs[row, :n], "labels": labels[row, :n]})
        return out


class CurriculumCallback(TrainerCallback):
    """The curriculum in a transformers Trainer: at each evaluation it feeds the perplexity
    exp(eval_loss) to cmgems.curriculum's schedule; a switch goes to the collator, to the log,
    and to the run of the Trainer's MLflow callback (tags curriculum.switch_step and
    curriculum.stage, metrics eval/ppl and curriculum/stage, artifact curriculum_events.json).

    cm_gems needs evaluations (eval_strategy "steps" or "epoch") on a frozen evaluation set
    (collator.frozen; the collator masking the eval_dataset itself gives the published scripts'
    fresh evaluation masking instead). switch_rule: cmgems.masking.curriculum.SWITCH_RULES.
    `events` holds the switches. Under several processes eval_loss is already
    gathered over all of them, so each takes the same decision at the same step.
    """

    def __init__(self, collator: MaskingCollator, threshold: float = 1.0, patience: int = 1,
                 min_switch_step: int = 0, switch_rule: str = "drop"):
        self.collator = collator
        self.threshold, self.patience, self.min_switch_step = threshold, patience, min_switch_step
        self.switch_rule = switch_rule
        self.schedule = None

    @property
    def events(self) -> list[dict]:
        return self.schedule.events if self.schedule is not None else []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.collator.mode == CM_GEMS and str(getattr(args, "eval_strategy", "no")) in (
                "no", "IntervalStrategy.NO"):
            raise InputError("CurriculumCallback: cm_gems switches on evaluation perplexity; set "
                             "TrainingArguments(eval_strategy='steps', eval_steps=N) and an "
                             "eval_dataset (collator.frozen(...))")
        self.schedule = make_schedule(self.collator.mode, max(1, state.max_steps),
                                      threshold=self.threshold, patience=self.patience,
                                      min_steps=self.min_switch_step,
                                      switch_rule=self.switch_rule)
        self.collator.set_step(state.global_step, state.max_steps)
        self.collator.set_stage(self.schedule.stage_index)

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer collates the next step's batches right after this
        self.collator.set_step(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or self.schedule is None:
            return
        ppl = math.exp(loss) if loss < 700 else math.inf
        event = self.schedule.observe(state.global_step, ppl)
        if event is not None:
            self.collator.set_stage(self.schedule.stage_index)
            log.warning("curriculum: %s -> %s at step %d (perplexity %.3f)", event["from"],
                     event["to"], event["step"], ppl)
        if state.is_world_process_zero:
            _log_to_mlflow(state.global_step, ppl, self.schedule, event)


def _log_to_mlflow(step: int, ppl: float, schedule, event: dict | None) -> None:
    """Into the run the Trainer's MLflowCallback opened (report_to="mlflow"), if there is one."""
    import importlib.util
    if importlib.util.find_spec("mlflow") is None:
        return
    import mlflow
    if mlflow.active_run() is None:
        return
    metrics = {"curriculum/stage": schedule.stage_index}
    if math.isfinite(ppl):
        metrics["eval/ppl"] = ppl
    mlflow.log_metrics(metrics, step=step)
    if event is not None:
        mlflow.set_tags({"curriculum.switch_step": event["step"],
                         "curriculum.stage": schedule.stage})
        mlflow.log_dict(schedule.events, RunLayout(".").events.name)
