"""The pretraining loop: data -> masking (curriculum) -> DeepSpeed engine -> evaluation ->
curriculum events -> MLflow, checkpoints, HF export.

Everything random is a pure function of (seed, step, rank): masks come from cmgems.rng, dropout is
reseeded at every micro-batch, the data order follows from the step count. A resumed run therefore
masks, drops out and reads exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from cmgems import checkpoint, distributed
from cmgems.config import PretrainConfig, resume_fields
from cmgems.curriculum import make_schedule
from cmgems.data import SampleDataset, TrainBatches, eval_loader
from cmgems.engine import build_ds_config, resolve_precision
from cmgems.errors import InputError
from cmgems.masking import mask_batch, mask_stats
from cmgems.models import build_model, count_parameters, export, flops_per_token
from cmgems.plots import perplexity_plot
from cmgems.rng import derive_seed, generator
from cmgems.shards import Manifest, ShardSet, verify
from cmgems.tracking import Tracker
from cmgems.tracking_uri import resolve_tracking_uri

log = logging.getLogger("cmgems")

REFERENCE_STRATEGY, REFERENCE_P = "random", 0.025
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


def default_output_dir(cfg: PretrainConfig) -> tuple[str, Path]:
    name = cfg.run_name or f"{cfg.model}-{cfg.mode.replace(':', '-')}-" \
                          f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return name, Path(cfg.output_dir) if cfg.output_dir else Path("runs") / name


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
        self.train_set = SampleDataset(ShardSet(cfg.data_dir, "train", self.manifest), cfg.max_length)
        self.valid_set = SampleDataset(ShardSet(cfg.data_dir, "valid", self.manifest), cfg.max_length)
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
    def _probabilities(self) -> dict[str, float]:
        c = self.cfg
        return {"random": c.p_random, "genemask": c.p_genemask, "global": c.p_global}

    def _mask(self, batch: dict, strategies, gen):
        return mask_batch(batch["input_ids"], batch["npmi"], batch["attention_mask"], strategies,
                          self.manifest.vocab_size, gen, k=self.k,
                          probabilities=self._probabilities())

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, strategy: str, probability: float | None = None) -> float:
        """Perplexity over the validation split with a frozen masking: the same positions at every
        evaluation (generator keyed by batch index only), so the number moves with the model only."""
        cfg, dev = self.cfg, self.dist.device
        probs = self._probabilities()
        if probability is not None:
            probs = {**probs, strategy: probability}
        loader = eval_loader(self.valid_set, cfg.micro_batch_size, self.dist.rank,
                             self.dist.world_size, 0)
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        for i, batch in enumerate(loader):
            if cfg.eval_batches and i >= cfg.eval_batches:
                break
            batch = {k: v.to(dev) for k, v in batch.items()}
            gen = generator(cfg.seed, i, self.dist.rank, f"eval-{strategy}")
            inputs, labels, _ = mask_batch(batch["input_ids"], batch["npmi"],
                                           batch["attention_mask"], strategy,
                                           self.manifest.vocab_size, gen, k=self.k,
                                           probabilities=probs)
            _, loss_sum, n = self.engine(inputs, batch["attention_mask"], labels)
            totals += torch.stack([loss_sum.double(), n.double()])
        self.engine.train()
        torch.distributed.all_reduce(totals)
        loss_sum, n = totals.tolist()
        return math.exp(loss_sum / n) if n else float("nan")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg, dist, st = self.cfg, self.dist, self.state
        dev = dist.device
        eval_strategy = cfg.eval_strategy or self.schedule.first_strategy
        stream = self.batches.from_position(st.step * cfg.grad_accum)
        progress = None
        if dist.is_main:
            from tqdm import tqdm
            progress = tqdm(total=cfg.max_steps, initial=st.step, desc=self.run_name,
                            dynamic_ncols=True, file=sys.stderr)
        t_last, samples_since, tokens_since, data_time = time.perf_counter(), 0, 0, 0.0
        stopped_by = None
        last_ppl = float("nan")
        try:
            while st.step < cfg.max_steps:
                step = st.step
                step_stats: list[dict] = []
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                n_sum = torch.zeros((), dtype=torch.float64, device=dev)
                t_step, step_data = time.perf_counter(), 0.0
                log_now = (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps
                grad_norm = None
                for micro in range(cfg.grad_accum):
                    t0 = time.perf_counter()
                    # Masking runs on the training device; its random numbers come from a CPU
                    # generator, so a GPU run masks exactly as a CPU run of the same seed.
                    batch = {k: v.to(dev, non_blocking=True) for k, v in next(stream).items()}
                    gen = generator(cfg.seed, step * cfg.grad_accum + micro, dist.rank, "mask")
                    strategies = self.schedule.strategies(step, batch["input_ids"].shape[0], gen)
                    inputs, labels, selected = self._mask(batch, strategies, gen)
                    attn = batch["attention_mask"]
                    if micro == 0 and log_now:
                        step_stats.append(mask_stats(selected, batch["npmi"], attn, strategies))
                    step_data += time.perf_counter() - t0
                    torch.manual_seed(derive_seed(cfg.seed, step * cfg.grad_accum + micro, dist.rank,
                                                  "dropout"))
                    loss, ls, n = self.engine(inputs, attn, labels)
                    self.engine.backward(loss)
                    if log_now and micro == cfg.grad_accum - 1 and cfg.zero_stage == 0:
                        grad_norm = _grad_norm(self.engine.module)  # ZeRO-0 reports none itself
                    self.engine.step()
                    loss_sum += ls.double()
                    n_sum += n.double()
                    samples_since += inputs.shape[0]
                    tokens_since += int(attn.sum())
                st.step += 1
                data_time += step_data

                flags = torch.tensor([float(self.stop.requested is not None)], device=dev)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                if flags.item() > 0:
                    stopped_by = self.stop.requested or "signal on another rank"

                if log_now:
                    totals = torch.stack([loss_sum, n_sum])
                    torch.distributed.all_reduce(totals)
                    train_loss = (totals[0] / totals[1].clamp(min=1)).item()
                    elapsed = time.perf_counter() - t_last
                    world = dist.world_size
                    metrics = {
                        "train/loss": train_loss,
                        "train/lr": self.engine.optimizer.param_groups[0]["lr"],
                        "perf/samples_per_s": samples_since * world / elapsed,
                        "perf/tokens_per_s": tokens_since * world / elapsed,
                        "perf/data_share": data_time / elapsed,
                        "curriculum/stage": self.schedule.stage_index,
                    }
                    grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
                    if grad_norm is not None:
                        metrics["train/grad_norm"] = float(grad_norm)
                    tflops = flops_per_token(self.bert_config, cfg.max_length) \
                        * metrics["perf/tokens_per_s"] / world / 1e12
                    metrics["perf/tflops_per_device"] = tflops
                    peak = next((v for k, v in PEAK_TFLOPS.items()
                                 if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)
                    if peak and self.precision in ("bf16", "fp16"):
                        metrics["perf/mfu"] = tflops / peak
                    for s in step_stats:
                        metrics.update({f"mask/{k}": v for k, v in s.items()})
                    self.tracker.log_metrics(metrics, st.step)
                    self.tracker.flush()
                    if progress is not None:
                        progress.set_postfix(loss=f"{train_loss:.3f}",
                                             ppl="-" if math.isnan(last_ppl) else f"{last_ppl:.1f}",
                                             stage=self.schedule.stage,
                                             sps=f"{metrics['perf/samples_per_s']:.1f}", refresh=False)
                    t_last, samples_since, tokens_since, data_time = time.perf_counter(), 0, 0, 0.0

                self.timings.append((time.perf_counter() - t_step, step_data))
                pause = time.perf_counter()  # evaluation and checkpoints stay out of throughput
                if st.step % cfg.eval_interval == 0 or st.step == cfg.max_steps:
                    last_ppl = self._evaluate_and_observe(eval_strategy)
                if stopped_by or st.step % cfg.save_interval == 0 or st.step == cfg.max_steps:
                    self._save()
                t_last += time.perf_counter() - pause
                if progress is not None:
                    progress.update(1)
                if stopped_by:
                    break
        finally:  # an error mid-run must not print onto the progress bar's line
            if progress is not None:
                progress.close()
        return self._finish(stopped_by)

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
