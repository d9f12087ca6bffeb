"""The pretraining loop: data -> masking (curriculum) -> DeepSpeed engine -> evaluation ->
curriculum events -> MLflow, checkpoints, HF export.

Everything random is a pure function of (seed, step, rank): masks come from cmgems.rng, dropout is
reseeded at every micro-batch, the data order follows from the step count. A resumed run therefore
masks, drops out and reads exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cmgems.pretrain import checkpoint, distributed, export
from cmgems.pretrain.config import PretrainConfig
from cmgems.options import resume_fields
from cmgems.masking.curriculum import make_schedule
from cmgems.data.loader import SampleDataset, TrainBatches, eval_loader
from cmgems.pretrain.engine import build_ds_config, ds_config_path, initialize, resolve_precision
from cmgems.errors import InputError
from cmgems.masking.maskings import mask_batch, mask_stats
from cmgems.masking.view import selections
from cmgems.masking.names import (DEFAULT_PROBABILITY, GLOBAL_M_BINOMIAL, MASKINGS,
                                  REFERENCE_MASKING, uses_pmi)
from cmgems.model.card import dataset_summary
from cmgems.model.architectures import build_model, count_parameters, flops_per_token
from cmgems.data.packing import choose_attention
from cmgems.tracking.plots import masks_plot, perplexity_plot
from cmgems.pretrain.preflight import check_scored, default_output_dir
from cmgems.progress import Progress, quiet_library_bars
from cmgems.rng import derive_seed, generator
from cmgems.pretrain.layout import RunLayout
from cmgems.pretrain.result import RunResult
from cmgems.pretrain.run_dir import RunDir
from cmgems.data.layout import DatasetDir
from cmgems.data.npmi_table import load_table
from cmgems.data.shards import Manifest, ShardSet, verify
from cmgems.tracking.tracker import Tracker
from cmgems.tracking.uri import resolve_tracking_uri

log = logging.getLogger("cmgems")

# ppl_ref: the same masking in every run, whatever its own probabilities, so runs compare.
REFERENCE_P = DEFAULT_PROBABILITY[REFERENCE_MASKING]
# bf16 dense peak of the GPUs MFU is reported for; other devices report achieved TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# Fault injection (tests, docs/faults.md): the loss of this 1-based optimizer step is made NaN
# before its backward pass, as a diverging run's would be.
FAULT_NAN_ENV = "CMGEMS_FAULT_NAN_LOSS"


class TrainingDiverged(InputError):
    """The loss stopped being a finite number: the settings (lr, warmup, precision) need
    changing; the last finite step is checkpointed."""


class MaskedLM(torch.nn.Module):
    """BertForMaskedLM that runs its vocabulary projection only at the selected positions
    (about 15 % of tokens): the head is a fifth of LOGO's compute over all positions.

    Takes a padded batch (2D attention mask) or a packed one (cmgems.data.packing: one row, position
    ids that restart in every sample, and among `attention_kwargs` the rows' token slots and
    block-diagonal mask or the variable-length kernel's cumulative lengths)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, position_ids=None, **attention_kwargs):
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, **attention_kwargs)[0]
        selected = labels != -100
        logits = self.model.cls(hidden[selected])
        loss_sum = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
        n = selected.sum()
        return loss_sum / n.clamp(min=1), loss_sum.detach(), n


def due(step: int, every: int, last: int | None = None) -> bool:
    """The interval rule: something done every `every` steps (0: never) is due at `step` when
    step is a multiple of it, and always at the `last` step."""
    return (every > 0 and step % every == 0) or step == last


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def check_compiler(device: torch.device) -> None:
    """compile on a CPU needs a C++ compiler for inductor's kernels: refused up front without one
    (inductor would fail at the first step, deep in a traceback)."""
    if device.type != "cpu":
        return
    import shutil

    from torch._inductor import config as inductor_config
    cxx = inductor_config.cpp.cxx
    names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c]
    if not any(shutil.which(c) for c in names or ("g++", "clang++", "c++")):
        raise InputError(f"compile: torch.compile on a CPU needs a C++ compiler "
                         f"({' or '.join(names) or 'g++ or clang++'}) on PATH; install one or "
                         f"drop --compile")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process: the first ones plus one per
    recompilation (a new shape, a train/eval switch), so it stays flat once shapes settle."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak at a 16-bit precision, where MFU is reported; None elsewhere."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass
class StepResult:
    """One optimizer step on this rank."""
    loss_sum: torch.Tensor           # summed loss over the predicted tokens (float64)
    n_predicted: torch.Tensor        # predicted (selected) tokens (float64)
    samples: int = 0
    tokens: int = 0                  # real (non-pad) tokens, [CLS] [SEP] included
    slots: int = 0                   # positions the dense layers computed
    attention_slots: int = 0         # positions attention covered (packed: rows x width)
    data_seconds: float = 0.0        # reading, masking and packing
    mask_stats: dict = field(default_factory=dict)  # of the first micro-batch, on logged steps
    grad_norm: float | None = None   # measured here on logged ZeRO-0 steps
    stop: str | None = None          # the signal that asks this run to stop after this step
    finite: bool = True              # the step's loss is finite on every rank


class Throughput:
    """Samples, real tokens, computed positions (dense layers, attention) and data seconds since
    the last reset, over the wall time spent training: what runs inside paused() is not counted.
    Counts come from the CPU side of each batch, so counting never waits on the device."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.data_seconds = time.perf_counter(), 0.0
        self.samples = self.tokens = self.slots = self.attention_slots = 0

    def add(self, result: StepResult) -> None:
        self.samples += result.samples
        self.tokens += result.tokens
        self.slots += result.slots
        self.attention_slots += result.attention_slots
        self.data_seconds += result.data_seconds

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0

    def rates(self, world_size: int) -> dict[str, float]:
        """perf/ metrics of all ranks together (every rank counts a like share)."""
        elapsed = time.perf_counter() - self.start
        return {"perf/samples_per_s": self.samples * world_size / elapsed,
                "perf/tokens_per_s": self.tokens * world_size / elapsed,
                "perf/real_token_share": self.tokens / self.slots if self.slots else float("nan"),
                "perf/attention_token_share": (self.tokens / self.attention_slots
                                               if self.attention_slots else float("nan")),
                "perf/data_share": self.data_seconds / elapsed}


@dataclass
class RunState:
    """What a checkpoint carries besides the engine (DeepSpeed's client_state)."""
    step: int = 0
    mlflow_run_id: str | None = None
    history: list = field(default_factory=list)     # evaluations: {step, ppl, ppl_ref, stage}


class StopFlag:
    """SIGTERM (Slurm preemption, kill), SIGUSR1 (Slurm's warning before a time limit) and SIGINT
    (Ctrl-C) ask for a checkpoint at the next step boundary, then a clean exit. A second Ctrl-C
    stops at once (KeyboardInterrupt), keeping the checkpoints already written.

    Installed before any DataLoader worker is forked: the workers inherit these handlers, so a
    Ctrl-C to the whole process group does not end them mid-epoch."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if _in_dataloader_worker():
            return  # the training process decides; it ends its workers when it stops
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nCtrl-C: stopping after this step with a checkpoint (again: stop now)",
                  file=sys.stderr, flush=True)


def _in_dataloader_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


class Trainer:
    def __init__(self, cfg: PretrainConfig, resume: bool = False):
        self.cfg = cfg
        self.dist = distributed.init()
        self.stop = StopFlag()
        name, out = default_output_dir(cfg)
        if self.dist.world_size > 1:  # a timestamped default name must be the same on every rank
            name, out = distributed.broadcast_object((name, out))
        self.run_name, self.out = name, out
        self.layout = RunLayout(out)
        self.data = DatasetDir(cfg.data_dir)
        self.ckpt_dir = self.layout.checkpoints
        self.run_dir = RunDir(self.out, self.dist.is_main)
        self.tracker = None
        self.timings: list[tuple[float, float]] = []  # per step: (seconds, data + masking seconds)
        nan_at = os.environ.get(FAULT_NAN_ENV, "")
        self._nan_at = int(nan_at) if nan_at else None
        try:
            self.run_dir.acquire(resume)
            self._load_data()
            tag = self._resumable() if resume else None  # refused before a model is built
            self._build_engine()
            self.schedule = make_schedule(cfg.mode, cfg.max_steps, threshold=cfg.threshold,
                                          patience=cfg.patience, min_steps=cfg.min_switch_step,
                                          draw=cfg.cm_step_draw, switch_rule=cfg.switch_rule)
            self.state = RunState()
            if tag is not None:
                self._load_checkpoint(tag)
            self._start_tracking(resumed=tag is not None)
        except BaseException as e:
            self._abort(e)
            raise

    # ---------------------------------------------------------------- set-up
    def _resumable(self) -> str | None:
        """The checkpoint --resume continues from (None: the run never completed one, so it
        starts at step 0). Its pointer, files, dataset and config are checked before DeepSpeed
        reads a byte; every rank raises rank 0's refusal."""
        def check() -> str | None:
            tag = checkpoint.resumable_tag(self.ckpt_dir)
            record = checkpoint.read_record(self.ckpt_dir / tag) if tag else None
            if record is not None:
                self._check_resumable(record.get("config", {}), record.get("data", {}))
            return tag
        return distributed.on_main(check, self.dist.is_main, catch=(InputError,))

    def _load_checkpoint(self, tag: str) -> None:
        client = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self._check_resumable(client.get("config", {}), client.get("data", {}))
        self.state = RunState(**client["run"])
        self.schedule.load_state_dict(client["curriculum"])

    def _data_identity(self) -> dict:
        return checkpoint.data_identity(self.manifest.checksum(), self.cfg.data_dir)

    def _check_resumable(self, saved: dict, data: dict) -> None:
        checkpoint.check_compatible(self.ckpt_dir, saved, self.cfg.to_dict(),
                                    resume_fields(PretrainConfig), data, self._data_identity())

    def _load_data(self) -> None:
        cfg = self.cfg
        self.manifest = Manifest.load(cfg.data_dir)
        self.k = self.manifest.k
        self.scored_fraction = check_scored(cfg, self.manifest)
        # Position lookup ranks by the table itself (per k-mer code), not by the shards' NPMI.
        self.npmi_table = None
        if cfg.pmi_lookup == "position":
            self.npmi_table = torch.as_tensor(load_table(self.data.npmi_table, self.k),
                                              dtype=torch.float32, device=self.dist.device)
        if cfg.verify_data:
            # Rank 0 hashes every shard; all ranks fail together with its message.
            distributed.on_main(lambda: verify(cfg.data_dir, self.manifest), self.dist.is_main)
        self.train_set = SampleDataset(ShardSet(cfg.data_dir, "train", self.manifest),
                                       cfg.max_length)
        self.valid_set = SampleDataset(ShardSet(cfg.data_dir, "valid", self.manifest),
                                       cfg.max_length)
        try:
            self.batches = TrainBatches(self.train_set, cfg.micro_batch_size, self.dist.rank,
                                        self.dist.world_size, cfg.seed, cfg.num_workers)
        except ValueError as e:
            raise InputError(f"{cfg.data_dir}: {e}") from None
        if len(self.valid_set) < self.dist.world_size:
            raise InputError(f"{cfg.data_dir}: {len(self.valid_set)} validation samples for "
                             f"{self.dist.world_size} ranks")

    def _build_engine(self) -> None:
        cfg = self.cfg
        # Before the model: a precision the device lacks is refused in a second, not after a
        # BERT-base is built.
        self.precision = resolve_precision(cfg.precision, self.dist.device)
        self.ds_config = build_ds_config(cfg, self.dist.world_size, self.dist.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.k, cfg.init_from)
        self.bert_config = model.config
        self.n_params = count_parameters(model)
        self.flops_per_token = flops_per_token(self.bert_config, cfg.max_length)
        self.peak_tflops = peak_tflops(self.dist.device, self.precision)
        self.packer = choose_attention(model, cfg.packing, cfg.max_length, self.dist.device,
                                       self.precision, cfg.packed_attention)
        if cfg.compile:
            check_compiler(self.dist.device)
        self.engine = initialize(MaskedLM(model), self.ds_config, ds_config_path(cfg),
                                 cfg.weight_decay)
        if cfg.compile:
            # DeepSpeed's engine.compile() rather than torch.compile(model) before initialize: it
            # compiles the engine's module in place (nn.Module.compile), after ZeRO has
            # installed its hooks (ZeRO-3's parameter gathering is compiler-disabled there, so
            # the graph calls it as DeepSpeed expects), and the parameter names keep no
            # "_orig_mod." prefix, so checkpoints and exports are those of an eager run. Only
            # the model's forward is compiled; masking and packing run before it, eager.
            # dynamic=True: batch shapes vary (rows and width of a packed batch, the longest
            # sample of a padded one, the count of selected positions the head runs at), and
            # one graph with symbolic sizes takes them all; torch's default (a static graph,
            # then a recompilation for each dimension seen changing) recompiled at steps 2 and
            # 5 of an 8-step run for the same losses. Bucketing shapes instead would add
            # padding for nothing the dynamic graph needs.
            from deepspeed.accelerator import get_accelerator
            backend = get_accelerator().get_compile_backend()
            self.engine.compile(backend=backend, compile_kwargs={"dynamic": True})
            log.info("compile: the model's forward through torch.compile (DeepSpeed "
                     "engine.compile, %s backend)", backend)

    def _start_tracking(self, resumed: bool) -> None:
        cfg = self.cfg
        uri = resolve_tracking_uri(self.out.parent, cfg.tracking_uri) if self.dist.is_main else ""
        self.tracker = Tracker(self.dist.is_main, uri, cfg.experiment, self.run_name,
                               run_id=self.state.mlflow_run_id, parent_run_id=cfg.parent_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        if not self.dist.is_main:
            return
        if cfg.system_metrics:
            self.tracker.start_system_metrics(resume=resumed)
        if resumed:
            self.tracker.skip_logged_steps()
            self.tracker.set_tag("resumed_at_step", self.state.step)
            return
        self.layout.config.write_text(json.dumps(cfg.to_dict(), indent=2))
        self.layout.ds_config.write_text(json.dumps(self.ds_config, indent=2))
        self.tracker.log_run_start(
            {"config": cfg.to_dict(), "ds": self.ds_config, "world_size": self.dist.world_size,
             "precision": self.precision, "n_params": self.n_params,
             "data.manifest_checksum": self.manifest.checksum(), "data.k": self.k,
             "data.scored_fraction": self.scored_fraction,
             "data.train_samples": len(self.train_set),
             "data.valid_samples": len(self.valid_set)},
            self.out, dataset_summary(self.manifest, cfg.data_dir),
            artifacts=(self.layout.config, self.layout.ds_config, self.data.npmi_table,
                       self.data.manifest))
        self.tracker.log_artifact(self._draw_masks())

    def _draw_masks(self) -> Path:
        """The run's maskings on the first 4 validation samples, as `cmgems masks` draws them."""
        cfg = self.cfg
        # cm_step's one stage mixes maskings: draw every masking there
        drawn = [m for m in self.schedule.stages if m in MASKINGS] or list(MASKINGS)
        picked = selections(cfg.data_dir, drawn, samples=4, seed=cfg.seed,
                            max_length=cfg.max_length, pmi_lookup=cfg.pmi_lookup,
                            probabilities=cfg.probabilities, global_m=cfg.global_m,
                            genemask_anchor_order=cfg.genemask_anchor_order)
        return masks_plot(picked, self.layout.masks_plot,
                          f"{self.run_name}: {self.schedule.describe()}")

    # ---------------------------------------------------------------- masking
    def _mask(self, batch: dict, strategies, gen, probabilities: dict[str, float] | None = None,
              text_masking: bool = False):
        """text_masking: the papers' readings (token lookup, top anchors, a per-sample m for
        global_m binomial) whatever this run's published-code options, so that runs trained
        either way are scored alike."""
        cfg = self.cfg
        global_m = cfg.global_m
        if text_masking and global_m == GLOBAL_M_BINOMIAL:
            global_m = 0
        return mask_batch(batch["input_ids"], batch["npmi"], batch["attention_mask"], strategies,
                          self.manifest.vocab_size, gen, k=self.k,
                          probabilities=cfg.probabilities if probabilities is None
                          else probabilities, global_m=global_m,
                          pmi_lookup="token" if text_masking else cfg.pmi_lookup,
                          npmi_table=self.npmi_table,
                          genemask_anchor_order="top" if text_masking
                          else cfg.genemask_anchor_order)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, strategy: str | None, probability: float | None = None,
                 fresh_step: int | None = None, text_masking: bool = False) -> float:
        """Perplexity over the validation split. By default with a frozen masking `strategy`:
        the same positions at every evaluation (generator keyed by batch index only), so the
        number moves with the model only. With fresh_step, the training masking of that step
        instead (the schedule's strategies, `strategy` unused), drawn anew for that step.
        text_masking: see _mask."""
        cfg, dev = self.cfg, self.dist.device
        probs = cfg.probabilities if probability is None else {**cfg.probabilities,
                                                               strategy: probability}
        loader = eval_loader(self.valid_set, cfg.micro_batch_size, self.dist.rank,
                             self.dist.world_size, 0)
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        for i, batch in enumerate(loader):
            if cfg.eval_batches and i >= cfg.eval_batches:
                break
            layout = self.packer.layout(batch)
            batch = {k: v.to(dev) for k, v in batch.items()}
            if fresh_step is None:
                gen = generator(cfg.seed, i, self.dist.rank, f"eval-{strategy}")
                strategies = strategy
            else:
                gen = generator(cfg.seed, i, self.dist.rank, f"eval-fresh-{fresh_step}")
                strategies = self.schedule.strategies(fresh_step, layout.samples, gen)
            inputs, labels, _ = self._mask(batch, strategies, gen, probs, text_masking)
            _, loss_sum, n = self.engine(**self.packer.model_inputs(
                layout, inputs, batch["attention_mask"], labels))
            totals += torch.stack([loss_sum.double(), n.double()])
        self.engine.train()
        loss_sum, n = distributed.all_reduce_sum(totals).tolist()
        return math.exp(loss_sum / n) if n else float("nan")

    # ---------------------------------------------------------------- the loop
    def train(self) -> RunResult:
        """Train to max_steps (or a stop signal); the run's result. On any failure the MLflow run
        ends FAILED (KILLED for a second Ctrl-C), the lock is released and an empty
        checkpoints/ is removed before the error goes up."""
        try:
            stopped_by = self._loop()
            return self._finish(stopped_by)
        except BaseException as e:
            self._abort(e)
            raise

    def _loop(self) -> str | None:
        cfg, st = self.cfg, self.state
        eval_strategy = cfg.eval_strategy or self.schedule.first_strategy
        stream = self.batches.from_position(st.step * cfg.grad_accum)
        progress = self._progress_bar()
        meter = Throughput()
        stopped_by, last_ppl = None, float("nan")
        try:
            while st.step < cfg.max_steps:
                t_step = time.perf_counter()
                log_now = due(st.step + 1, cfg.log_interval, cfg.max_steps)
                # one optimizer step; a non-finite loss stops the run before it is applied
                result = self._train_step(st.step, stream, log_now)
                if not result.finite:
                    self._diverged(result)
                st.step += 1
                meter.add(result)
                stopped_by = result.stop
                if log_now:
                    self._log(self._train_metrics(result, meter), progress, last_ppl)
                    meter.reset()  # the logging itself stays out of throughput
                self.timings.append((time.perf_counter() - t_step, result.data_seconds))
                # evaluation, checkpoints and exports, outside throughput
                with meter.paused():
                    if due(st.step, cfg.eval_interval, cfg.max_steps):
                        last_ppl = self._evaluate_and_observe(eval_strategy)
                        if progress is not None:  # a switch: the next line names the new stage
                            progress.update_postfix(**self._curriculum_shown(last_ppl))
                    if stopped_by or due(st.step, cfg.save_interval, cfg.max_steps):
                        self._save()
                    if due(st.step, cfg.export_interval):
                        self._export_step()
                if progress is not None:
                    progress.update(1)
                if stopped_by:
                    break
        finally:  # an error mid-run must not print onto the progress bar's line
            if progress is not None:
                progress.close()
        return stopped_by

    def _train_step(self, step: int, stream, log_now: bool) -> StepResult:
        """One optimizer step over grad_accum micro-batches: read, mask, forward, backward."""
        cfg, rank, dev = self.cfg, self.dist.rank, self.dist.device
        result = StepResult(torch.zeros((), dtype=torch.float64, device=dev),
                            torch.zeros((), dtype=torch.float64, device=dev))
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            index = step * cfg.grad_accum + micro
            cpu_batch = next(stream)
            layout = self.packer.layout(cpu_batch)  # from the CPU lengths: no device read-back
            # Masking runs on the training device, per sample on the padded batch; its random
            # numbers come from a CPU generator, so a GPU run masks exactly as a CPU run of the
            # same seed. Packing only moves the masked tokens into the layout's rows.
            batch = {k: v.to(dev, non_blocking=True) for k, v in cpu_batch.items()}
            gen = generator(cfg.seed, index, rank, "mask")
            strategies = self.schedule.strategies(step, layout.samples, gen)
            inputs, labels, selected = self._mask(batch, strategies, gen)
            attn = batch["attention_mask"]
            if micro == 0 and log_now:
                result.mask_stats = mask_stats(selected, batch["npmi"], attn, strategies)
            model_inputs = self.packer.model_inputs(layout, inputs, attn, labels)
            result.data_seconds += time.perf_counter() - t0
            torch.manual_seed(derive_seed(cfg.seed, index, rank, "dropout"))
            loss, loss_sum, n = self.engine(**model_inputs)
            if self._nan_at == step + 1:
                loss, loss_sum = loss * math.nan, loss_sum * math.nan
            self.engine.backward(loss)
            if log_now and micro == cfg.grad_accum - 1 and cfg.zero_stage == 0:
                result.grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 reports none itself
            result.loss_sum += loss_sum.double()
            result.n_predicted += n.double()
            result.samples += layout.samples
            result.tokens += layout.real_tokens
            result.slots += layout.slots
            result.attention_slots += layout.attention_slots
            if micro == cfg.grad_accum - 1:
                # The step's one host sync, before its update: a non-finite loss never reaches
                # the weights.
                result.stop, result.finite = self._step_flags(result.loss_sum)
                if not result.finite:
                    return result
            self.engine.step()
        return result

    def _step_flags(self, loss_sum: torch.Tensor) -> tuple[str | None, bool]:
        """(the signal asking this run to stop, if any rank got one; whether the step's loss is
        finite on every rank), from one all-reduce: all ranks stop at the same step."""
        stop = torch.tensor(float(self.stop.requested is not None), dtype=torch.float64,
                            device=loss_sum.device)
        bad = (~torch.isfinite(loss_sum)).double()
        stopped, bad = distributed.all_reduce_max(torch.stack([stop, bad])).tolist()
        return (self.stop.requested or "signal on another rank") if stopped else None, not bad

    def _diverged(self, result: StepResult) -> None:
        """Stop on a non-finite loss: checkpoint the last finite step (its weights, untouched by
        this step's update) unless it is checkpointed already, and say what to change."""
        step = self.state.step
        tag = checkpoint.tag_for(step)
        if step == 0:
            where = "nothing to checkpoint (it was the first step)"
        elif self._weights_finite():
            if checkpoint.latest_tag(self.ckpt_dir) != tag:
                self._save()
            where = f"{self.ckpt_dir / tag} holds step {step}, the last finite one"
        else:
            where = (f"the weights of step {step} are not finite either, so nothing new was "
                     f"checkpointed ({checkpoint.latest_tag(self.ckpt_dir) or 'none'} is the "
                     f"newest checkpoint)")
        raise TrainingDiverged(
            f"{self.out}: the training loss of step {step + 1} is not finite "
            f"({result.loss_sum.item()} on rank {self.dist.rank}); stopped before applying it: "
            f"{where}; lower lr, raise warmup_steps, set grad_clip or use fp32, then --resume")

    def _weights_finite(self) -> bool:
        """Every rank's parameters (its ZeRO-3 partition) are finite (collective)."""
        bad = any(not torch.isfinite(getattr(p, "ds_tensor", p)).all()
                  for p in self.engine.module.parameters())
        return not distributed.any_rank(bad)

    def _train_metrics(self, result: StepResult, meter: Throughput) -> dict[str, float]:
        """What a logged step reports (collective: every rank all-reduces the step's loss)."""
        totals = distributed.all_reduce_sum(torch.stack([result.loss_sum, result.n_predicted]))
        metrics = {
            "train/loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "train/lr": self.engine.optimizer.param_groups[0]["lr"],
            **meter.rates(self.dist.world_size),
            "curriculum/stage": self.schedule.stage_index,
        }
        grad_norm = (self.engine.get_global_grad_norm() if result.grad_norm is None
                     else result.grad_norm)
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        tflops = self.flops_per_token * metrics["perf/tokens_per_s"] / self.dist.world_size / 1e12
        metrics["perf/tflops_per_device"] = tflops
        if self.peak_tflops is not None:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        if self.cfg.compile:
            metrics["perf/compiled_graphs"] = compiled_graphs()
        metrics.update({f"mask/{k}": v for k, v in result.mask_stats.items()})
        return metrics

    def _progress_bar(self) -> Progress | None:
        """Rank 0's bar on a terminal; in a log file a plain line every log_interval steps."""
        if not self.dist.is_main:
            return None
        quiet_library_bars()
        return Progress(self.cfg.max_steps, self.run_name, unit="step", initial=self.state.step,
                        every=self.cfg.log_interval)

    def _log(self, metrics: dict[str, float], progress, last_ppl: float) -> None:
        self.tracker.log_metrics(metrics, self.state.step)
        self.tracker.flush()
        if progress is not None:
            progress.update_postfix(loss=f"{metrics['train/loss']:.3f}",
                                    **self._curriculum_shown(last_ppl),
                                    sps=f"{metrics['perf/samples_per_s']:.1f}")

    def _curriculum_shown(self, last_ppl: float) -> dict[str, str]:
        """The progress line's perplexity and stage as they stand now."""
        return {"ppl": "-" if math.isnan(last_ppl) else f"{last_ppl:.1f}",
                "stage": self.schedule.stage}

    def _evaluate_and_observe(self, eval_strategy: str) -> float:
        st = self.state
        fresh = self.cfg.eval_masking == "fresh"
        ppl = self.evaluate(eval_strategy, fresh_step=st.step if fresh else None)
        ppl_ref = self.evaluate(REFERENCE_MASKING, REFERENCE_P)
        # ppl is already all-reduced: every rank feeds the schedule the same number and so takes
        # the same decision at the same step.
        stage_before = self.schedule.stage
        event = self.schedule.observe(st.step, ppl)
        st.history.append({"step": st.step, "ppl": ppl, "ppl_ref": ppl_ref, "stage": stage_before})
        self.tracker.log_metrics({"eval/ppl": ppl, "eval/ppl_ref": ppl_ref,
                                  "curriculum/stage": self.schedule.stage_index}, st.step)
        if event is not None:
            log.info("curriculum: %s -> %s at step %d (perplexity %.3f)", event["from"],
                     event["to"], event["step"], ppl)
            self.tracker.set_tag("curriculum.switch_step", event["step"])
            self.tracker.set_tag("curriculum.stage", self.schedule.stage)
            self._write_events()
        self.tracker.flush()
        return ppl

    def _write_events(self) -> None:
        if not self.dist.is_main:
            return
        path = self.layout.events
        path.write_text(json.dumps(self.schedule.events, indent=2))
        self.tracker.log_artifact(path)

    def _save(self) -> None:
        if self.dist.is_main:  # the MLflow run may have been created late (store down at start)
            self.state.mlflow_run_id = self.tracker.run_id
        client = {"run": vars(self.state), "curriculum": self.schedule.state_dict(),
                  "config": self.cfg.to_dict(), "bert_config": self.bert_config.to_dict(),
                  "data": self._data_identity()}
        checkpoint.save(self.engine, self.ckpt_dir, self.state.step, client, self.dist.is_main,
                        self.cfg.keep_checkpoints,
                        record={"config": self.cfg.to_dict(), "data": self._data_identity()})

    def _export_info(self) -> dict:
        """cmgems.json of an export: where the model came from (the model card renders it)."""
        cfg, st, events = self.cfg, self.state, self.schedule.events
        return {"run_name": self.run_name, "step": st.step, "max_steps": cfg.max_steps,
                "mode": cfg.mode, "model": cfg.model, "n_params": self.n_params,
                "max_length": cfg.max_length, "seed": cfg.seed,
                "init_from": cfg.init_from, "license": cfg.license,
                "mlflow_run_id": self.tracker.run_id,
                "mlflow_tracking_uri": self.tracker.tracking_uri,
                "curriculum": {"mode": cfg.mode, "threshold": cfg.threshold,
                               "patience": cfg.patience, "min_switch_step": cfg.min_switch_step,
                               "switch_step": self.schedule.switch_step,
                               "description": self.schedule.describe(), "events": events},
                "evaluation": st.history[-1] if st.history else None,
                "data": dataset_summary(self.manifest, cfg.data_dir)}

    def _export(self, dest: Path, final: bool) -> None:
        """The HF export of the current weights into dest (collective), logged as an MLflow model;
        the final one is registered under --register-model if given."""
        export.write(self.engine, self.bert_config, self._export_info, dest, final,
                     self.dist.is_main)
        if self.dist.is_main and self.cfg.log_model:
            export.log_model(self.tracker, dest, self.state.step, final, self.cfg.register_model)

    def _export_step(self) -> None:
        """export/step-<N>/: the model at this step, kept (never pruned with checkpoints)."""
        dest = self.layout.step_export(self.state.step)
        if self.dist.is_main:
            dest.parent.mkdir(exist_ok=True)
        self._export(dest, final=False)
        self.tracker.set_tag(f"export.step-{self.state.step}", str(dest.resolve()))

    def final_perplexities(self) -> dict[str, float | None]:
        """Validation perplexity of the model under each frozen masking at its default
        probability, with the papers' readings whatever published-code options trained the
        model (token lookup, top anchors, per-sample m for binomial; the same in every run, so models trained differently
        compare); None for a PMI masking the dataset's NPMI table cannot support."""
        usable = self.scored_fraction >= self.cfg.min_scored_fraction
        return {s: self.evaluate(s, DEFAULT_PROBABILITY[s], text_masking=True)
                if usable or not uses_pmi(s) else None for s in MASKINGS}

    def _finish(self, stopped_by: str | None) -> RunResult:
        st, layout = self.state, self.layout
        events = self.schedule.events
        result = RunResult(step=st.step, stopped_by=stopped_by, output_dir=str(self.out),
                           mlflow_run_id=st.mlflow_run_id, stage=self.schedule.stage,
                           switch_step=self.schedule.switch_step, events=events,
                           history=st.history)
        if stopped_by is None:
            result.final_ppl = self.final_perplexities()
            self.tracker.log_metrics({f"final/ppl_{s}": v for s, v in result.final_ppl.items()
                                      if v is not None}, st.step)
            self._export(layout.export, final=True)
        if self.dist.is_main:
            if st.history:
                plot = perplexity_plot(st.history, events, layout.perplexity_plot,
                                       f"{self.run_name} ({self.cfg.model}, {self.cfg.mode})")
                self.tracker.log_artifact(plot)
            self._write_events()
            for name in ("config.json", "cmgems.json", "README.md"):
                self.tracker.log_artifact(layout.export / name, "export")
            self.tracker.finish("FINISHED" if stopped_by is None else "KILLED")
            result.mlflow_run_id = self.tracker.run_id
            result.tracking = self.tracker.summary()
            result.write(layout.result)
            log.info("run %s: step %d, stage %s, tracking %s", self.run_name, st.step,
                     self.schedule.stage, result.tracking)
        self.run_dir.release(failed=False)
        distributed.shutdown()
        return result

    def _abort(self, err: BaseException) -> None:
        """After a failure: end the MLflow run (KILLED for Ctrl-C, else FAILED), unlock, remove
        the empty directories this run made, and leave the process group without waiting for
        ranks that may never come."""
        if self.tracker is not None and self.dist.is_main:
            interrupted = isinstance(err, KeyboardInterrupt)
            self.tracker.set_tag("error", " ".join(str(err).split())[:500] or type(err).__name__)
            self.tracker.finish("KILLED" if interrupted else "FAILED")
        self.run_dir.release(failed=True)
        distributed.shutdown(wait=False)
