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
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cmgems import checkpoint, distributed
from cmgems.config import PretrainConfig
from cmgems.options import resume_fields
from cmgems.curriculum import make_schedule
from cmgems.data import SampleDataset, TrainBatches, eval_loader
from cmgems.engine import build_ds_config, resolve_precision
from cmgems.errors import InputError
from cmgems.masking import DEFAULT_PROBABILITY, mask_batch, mask_stats
from cmgems.models import build_model, count_parameters, export, flops_per_token
from cmgems.plots import perplexity_plot
from cmgems.preflight import default_output_dir
from cmgems.progress import Progress, quiet_library_bars
from cmgems.rng import derive_seed, generator
from cmgems.shards import Manifest, ShardSet, verify
from cmgems.tracking import Tracker
from cmgems.tracking_uri import resolve_tracking_uri

log = logging.getLogger("cmgems")

# ppl_ref: the same masking in every run, whatever its own probabilities, so runs compare.
REFERENCE_STRATEGY = "random"
REFERENCE_P = DEFAULT_PROBABILITY[REFERENCE_STRATEGY]
# bf16 dense peak of the GPUs MFU is reported for; other devices report achieved TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class MaskedLM(torch.nn.Module):
    """BertForMaskedLM that runs its vocabulary projection only at the selected positions
    (about 15 % of tokens): the head is a fifth of LOGO's compute over all positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        selected = labels != -100
        logits = self.model.cls(hidden[selected])
        loss_sum = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
        n = selected.sum()
        return loss_sum / n.clamp(min=1), loss_sum.detach(), n


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


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
    tokens: int = 0                  # attended tokens, [CLS] [SEP] included
    data_seconds: float = 0.0        # reading and masking
    mask_stats: dict = field(default_factory=dict)  # of the first micro-batch, on logged steps
    grad_norm: float | None = None   # measured here on logged ZeRO-0 steps


class Throughput:
    """Samples, tokens and data seconds since the last reset, over the wall time spent training:
    what runs inside paused() is not counted."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.tokens, self.data_seconds = time.perf_counter(), 0, 0, 0.0

    def add(self, samples: int, tokens: int, data_seconds: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.data_seconds += data_seconds

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
                "perf/data_share": self.data_seconds / elapsed}


@dataclass
class RunState:
    """What a checkpoint carries besides the engine (DeepSpeed's client_state)."""
    step: int = 0
    mlflow_run_id: str | None = None
    history: list = field(default_factory=list)     # evaluations: {step, ppl, ppl_ref, stage}


class StopFlag:
    """SIGTERM (Slurm preemption, kill) and SIGUSR1 (Slurm's warning before a time limit) ask for
    a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self):
        self.requested = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.requested = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: PretrainConfig, resume: bool = False):
        self.cfg = cfg
        self.dist = distributed.init()
        self.stop = StopFlag()
        name, out = default_output_dir(cfg)
        if self.dist.world_size > 1:  # a timestamped default name must be the same on every rank
            name, out = distributed.broadcast_object((name, out))
        self.run_name, self.out = name, out
        self.ckpt_dir = self.out / "checkpoints"
        self._check_output_dir(resume)
        self._load_data()
        self._build_engine()
        self.schedule = make_schedule(cfg.mode, cfg.max_steps, threshold=cfg.threshold,
                                      patience=cfg.patience, min_steps=cfg.min_switch_step)
        self.state = RunState()
        self.timings: list[tuple[float, float]] = []  # per step: (seconds, data + masking seconds)
        client = checkpoint.load(self.engine, self.ckpt_dir) if resume else None
        if client is not None:
            self._check_resumable(client.get("config", {}))
            self.state = RunState(**client["run"])
            self.schedule.load_state_dict(client["curriculum"])
        self._start_tracking(resumed=client is not None)

    # ---------------------------------------------------------------- set-up
    def _check_output_dir(self, resume: bool) -> None:
        exists = checkpoint.latest_tag(self.ckpt_dir) is not None
        if exists and not resume:
            raise InputError(f"{self.out}: holds checkpoints of an earlier run; pass --resume to "
                             f"continue it, or choose another --output-dir")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)

    def _check_resumable(self, saved: dict) -> None:
        now = self.cfg.to_dict()
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in resume_fields(PretrainConfig)
                if k in saved and saved[k] != now[k]]
        if diff:
            raise InputError(f"{self.ckpt_dir}: the checkpoint was made with another config ("
                             + "; ".join(diff) + "); resume with the original settings")

    def _load_data(self) -> None:
        cfg = self.cfg
        self.manifest = Manifest.load(cfg.data_dir)
        if cfg.verify_data:
            # Rank 0 hashes every shard; all ranks fail together with its message.
            err = None
            if self.dist.is_main:
                try:
                    verify(cfg.data_dir, self.manifest)
                except Exception as e:  # noqa: BLE001
                    err = e
            err = distributed.broadcast_object(err)
            if err is not None:
                raise err
        self.k = self.manifest.k
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
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, self.k, cfg.init_from)
        self.bert_config = model.config
        self.n_params = count_parameters(model)
        self.ds_config = build_ds_config(cfg, self.dist.world_size, self.dist.device)
        self.precision = resolve_precision(cfg.precision, self.dist.device)
        self.flops_per_token = flops_per_token(self.bert_config, cfg.max_length)
        self.peak_tflops = peak_tflops(self.dist.device, self.precision)
        self.engine, _, _, _ = deepspeed.initialize(model=MaskedLM(model),
                                                    model_parameters=model.parameters(),
                                                    config=self.ds_config)

    def _start_tracking(self, resumed: bool) -> None:
        cfg = self.cfg
        uri = resolve_tracking_uri(self.out.parent)
        self.tracker = Tracker(self.dist.is_main, uri, cfg.experiment, self.run_name,
                               run_id=self.state.mlflow_run_id, parent_run_id=cfg.parent_run_id)
        self.state.mlflow_run_id = self.tracker.run_id
        if not self.dist.is_main:
            return
        if resumed:
            self.tracker.skip_logged_steps()
            self.tracker.set_tag("resumed_at_step", self.state.step)
            return
        import deepspeed
        import mlflow
        import transformers
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (self.out / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        self.tracker.log_params({
            "config": cfg.to_dict(), "ds": self.ds_config, "world_size": self.dist.world_size,
            "precision": self.precision, "n_params": self.n_params,
            "data.manifest_checksum": self.manifest.checksum(), "data.k": self.k,
            "data.train_samples": len(self.train_set), "data.valid_samples": len(self.valid_set),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": transformers.__version__, "mlflow": mlflow.__version__,
                         "python": sys.version.split()[0]},
        })
        self.tracker.set_tag("output_dir", str(self.out.resolve()))
        for path in (self.out / "config.json", self.out / "ds_config.json",
                     Path(cfg.data_dir) / "npmi.tsv", Path(cfg.data_dir) / "manifest.json"):
            self.tracker.log_artifact(path)

    # ---------------------------------------------------------------- masking
    def _mask(self, batch: dict, strategies, gen, probabilities: dict[str, float] | None = None):
        return mask_batch(batch["input_ids"], batch["npmi"], batch["attention_mask"], strategies,
                          self.manifest.vocab_size, gen, k=self.k,
                          probabilities=self.cfg.probabilities if probabilities is None
                          else probabilities)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, strategy: str, probability: float | None = None) -> float:
        """Perplexity over the validation split with a frozen masking: the same positions at every
        evaluation (generator keyed by batch index only), so the number moves with the model
        only."""
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
            batch = {k: v.to(dev) for k, v in batch.items()}
            gen = generator(cfg.seed, i, self.dist.rank, f"eval-{strategy}")
            inputs, labels, _ = self._mask(batch, strategy, gen, probs)
            _, loss_sum, n = self.engine(inputs, batch["attention_mask"], labels)
            totals += torch.stack([loss_sum.double(), n.double()])
        self.engine.train()
        loss_sum, n = distributed.all_reduce_sum(totals).tolist()
        return math.exp(loss_sum / n) if n else float("nan")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg, st = self.cfg, self.state
        eval_strategy = cfg.eval_strategy or self.schedule.first_strategy
        stream = self.batches.from_position(st.step * cfg.grad_accum)
        progress = self._progress_bar()
        meter = Throughput()
        stopped_by, last_ppl = None, float("nan")
        try:
            while st.step < cfg.max_steps:
                t_step = time.perf_counter()
                log_now = (st.step + 1) % cfg.log_interval == 0 or st.step + 1 == cfg.max_steps
                out = self._train_step(st.step, stream, log_now)
                st.step += 1
                meter.add(out.samples, out.tokens, out.data_seconds)
                stopped_by = self._stop_requested()
                if log_now:
                    self._log(self._train_metrics(out, meter), progress, last_ppl)
                    meter.reset()  # the logging itself stays out of throughput
                self.timings.append((time.perf_counter() - t_step, out.data_seconds))
                with meter.paused():  # evaluation and checkpoints stay out of throughput
                    if st.step % cfg.eval_interval == 0 or st.step == cfg.max_steps:
                        last_ppl = self._evaluate_and_observe(eval_strategy)
                    if stopped_by or st.step % cfg.save_interval == 0 or st.step == cfg.max_steps:
                        self._save()
                if progress is not None:
                    progress.update(1)
                if stopped_by:
                    break
        finally:  # an error mid-run must not print onto the progress bar's line
            if progress is not None:
                progress.close()
        return self._finish(stopped_by)

    def _train_step(self, step: int, stream, log_now: bool) -> StepResult:
        """One optimizer step over grad_accum micro-batches: read, mask, forward, backward."""
        cfg, rank, dev = self.cfg, self.dist.rank, self.dist.device
        out = StepResult(torch.zeros((), dtype=torch.float64, device=dev),
                         torch.zeros((), dtype=torch.float64, device=dev))
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            index = step * cfg.grad_accum + micro
            # Masking runs on the training device; its random numbers come from a CPU generator,
            # so a GPU run masks exactly as a CPU run of the same seed.
            batch = {k: v.to(dev, non_blocking=True) for k, v in next(stream).items()}
            gen = generator(cfg.seed, index, rank, "mask")
            strategies = self.schedule.strategies(step, batch["input_ids"].shape[0], gen)
            inputs, labels, selected = self._mask(batch, strategies, gen)
            attn = batch["attention_mask"]
            if micro == 0 and log_now:
                out.mask_stats = mask_stats(selected, batch["npmi"], attn, strategies)
            out.data_seconds += time.perf_counter() - t0
            torch.manual_seed(derive_seed(cfg.seed, index, rank, "dropout"))
            loss, loss_sum, n = self.engine(inputs, attn, labels)
            self.engine.backward(loss)
            if log_now and micro == cfg.grad_accum - 1 and cfg.zero_stage == 0:
                out.grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 reports none itself
            self.engine.step()
            out.loss_sum += loss_sum.double()
            out.n_predicted += n.double()
            out.samples += inputs.shape[0]
            out.tokens += int(attn.sum())
        return out

    def _stop_requested(self) -> str | None:
        """The signal asking this run to stop, if any rank got one: all stop at the same step."""
        flag = torch.tensor([float(self.stop.requested is not None)], device=self.dist.device)
        if distributed.all_reduce_max(flag).item() > 0:
            return self.stop.requested or "signal on another rank"
        return None

    def _train_metrics(self, out: StepResult, meter: Throughput) -> dict[str, float]:
        """What a logged step reports (collective: every rank all-reduces the step's loss)."""
        totals = distributed.all_reduce_sum(torch.stack([out.loss_sum, out.n_predicted]))
        metrics = {
            "train/loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "train/lr": self.engine.optimizer.param_groups[0]["lr"],
            **meter.rates(self.dist.world_size),
            "curriculum/stage": self.schedule.stage_index,
        }
        grad_norm = self.engine.get_global_grad_norm() if out.grad_norm is None else out.grad_norm
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        tflops = self.flops_per_token * metrics["perf/tokens_per_s"] / self.dist.world_size / 1e12
        metrics["perf/tflops_per_device"] = tflops
        if self.peak_tflops is not None:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        metrics.update({f"mask/{k}": v for k, v in out.mask_stats.items()})
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
            progress.set_postfix(loss=f"{metrics['train/loss']:.3f}",
                                 ppl="-" if math.isnan(last_ppl) else f"{last_ppl:.1f}",
                                 stage=self.schedule.stage,
                                 sps=f"{metrics['perf/samples_per_s']:.1f}")

    def _evaluate_and_observe(self, eval_strategy: str) -> float:
        st = self.state
        ppl = self.evaluate(eval_strategy)
        ppl_ref = self.evaluate(REFERENCE_STRATEGY, REFERENCE_P)
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
        path = self.out / "curriculum_events.json"
        path.write_text(json.dumps(self.schedule.events, indent=2))
        self.tracker.log_artifact(path)

    def _save(self) -> None:
        if self.dist.is_main:  # the MLflow run may have been created late (store down at start)
            self.state.mlflow_run_id = self.tracker.run_id
        client = {"run": vars(self.state), "curriculum": self.schedule.state_dict(),
                  "config": self.cfg.to_dict(), "bert_config": self.bert_config.to_dict()}
        checkpoint.save(self.engine, self.ckpt_dir, self.state.step, client, self.dist.is_main,
                        self.cfg.keep_checkpoints)

    def _full_state_dict(self) -> dict | None:
        """fp32 weights gathered to rank 0 (collective: every rank calls it)."""
        import deepspeed
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if not self.dist.is_main:
                return None
            return {k.removeprefix("model."): v.detach().float().cpu().clone()
                    for k, v in self.engine.module.state_dict().items()}

    def _finish(self, stopped_by: str | None) -> dict:
        st, out = self.state, self.out
        result = {"step": st.step, "stopped_by": stopped_by, "output_dir": str(out),
                  "mlflow_run_id": st.mlflow_run_id, "stage": self.schedule.stage,
                  "events": self.schedule.events, "history": st.history}
        if stopped_by is None:
            state = self._full_state_dict()
            if self.dist.is_main:
                export(state, self.bert_config, out / "export",
                       {"run_name": self.run_name, "step": st.step, "mode": self.cfg.mode})
        if self.dist.is_main:
            if st.history:
                plot = perplexity_plot(st.history, self.schedule.events, out / "perplexity.png",
                                       f"{self.run_name} ({self.cfg.model}, {self.cfg.mode})")
                self.tracker.log_artifact(plot)
            self._write_events()
            self.tracker.log_artifact(out / "export" / "config.json", "export")
            self.tracker.finish("FINISHED" if stopped_by is None else "KILLED")
            result["mlflow_run_id"] = self.tracker.run_id
            result["tracking"] = self.tracker.summary()
            (out / "result.json").write_text(json.dumps(result, indent=2))
            log.info("run %s: step %d, stage %s, tracking %s", self.run_name, st.step,
                     self.schedule.stage, result["tracking"])
        distributed.shutdown()
        return result
