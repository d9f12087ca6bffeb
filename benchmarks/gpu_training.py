"""The training checks of benchmarks/gpu_check.sh (`gpu_train.py train` and `cm-gems`), apart from
its table commands: torch, transformers and DeepSpeed take seconds to import, and the table
commands run once per check."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT
from cmgems.pretrain.config import PretrainConfig
from cmgems.pretrain.engine import choose_adam
from cmgems.data.loader import SampleDataset, TrainBatches
from cmgems.model.architectures import flops_per_token
from cmgems.data.shards import ShardSet
from cmgems.errors import InputError
from cmgems.pretrain.trainer import Trainer, compiled_graphs, peak_tflops


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedTrainer(Trainer):
    """The Trainer, clocked between the end of step `warmup` and the end of the last step, the
    device synchronised there only (GPU steps run ahead of the host)."""

    warmup = 0

    def _train_step(self, step, *args, **kwargs):
        out = super()._train_step(step, *args, **kwargs)
        if step + 1 in (self.warmup, self.cfg.max_steps):
            sync()
            self.clock = getattr(self, "clock", []) + [time.perf_counter()]
        return out


def step_tokens(cfg: PretrainConfig) -> list[tuple[int, int]]:
    """(samples, real tokens) of each step's micro-batches, as the loader serves them."""
    stream = TrainBatches(SampleDataset(ShardSet(cfg.data_dir, "train"), cfg.max_length),
                          cfg.micro_batch_size, 0, 1, cfg.seed, 0).from_position(0)
    out = []
    for _ in range(cfg.max_steps):
        batches = [next(stream) for _ in range(cfg.grad_accum)]
        out.append((sum(len(b["lengths"]) for b in batches),
                    sum(int(b["lengths"].sum()) for b in batches)))
    return out


def optimizer_config(args) -> tuple[str, str]:
    """(ds_config, optimizer in words): the trainer's own choice (cmgems.pretrain.engine.choose_adam:
    DeepSpeed's fused Adam where it can be built, else torch's fused AdamW)."""
    if args.ds_config:
        return args.ds_config, f"optimizer of {args.ds_config}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = json.loads((ROOT / "ds_configs" / "zero0.json").read_text())
    return "", choose_adam(config, device)


def base_config(args, tmp: Path, **over) -> PretrainConfig:
    values = dict(data_dir=args.data_dir, output_dir=str(tmp / "run"), model=args.model,
                  mode="cm_gems", max_steps=args.steps, micro_batch_size=args.micro_batch_size,
                  grad_accum=1, max_length=args.max_length, eval_interval=10 ** 9,
                  save_interval=10 ** 9, log_interval=10 ** 9, warmup_steps=10,
                  num_workers=args.workers, eval_batches=1, precision=args.precision,
                  run_name=f"gpu-check-{args.model}")
    values["ds_config"], args.optimizer = optimizer_config(args)
    values.update(over)
    return PretrainConfig(**values)


def train(args) -> list[dict]:
    attention = f" ({args.attention} attention)" if args.packing == "on" else ""
    setting = (f"{args.model}, {args.packing_label}{attention}, {args.micro_batch_size} x "
               f"{args.max_length}, {args.precision}{', compiled' if args.compile else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, Path(tmp), packing=args.packing == "on",
                          packed_attention=args.attention, compile=args.compile)
        counts = step_tokens(cfg)
        try:
            trainer = TimedTrainer(cfg)
        except InputError as e:
            if "packed_attention" not in str(e):
                raise
            # a path this machine lacks (flash-attn not installed, no GPU): a row that says so
            return [{"check": "training", "setting": setting, "status": "skipped",
                     "note": str(e).split(": ", 1)[-1]}]
        trainer.warmup = args.warmup
        trainer.train()
        start, end = trainer.clock
        samples = sum(s for s, _ in counts[args.warmup:])
        tokens = sum(t for _, t in counts[args.warmup:])
        per_s = tokens / (end - start)
        tflops = flops_per_token(trainer.bert_config, cfg.max_length) * per_s / 1e12
        peak = peak_tflops(trainer.dist.device, trainer.precision)
        memory = (f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB"
                  if torch.cuda.is_available() else "")
    graphs = f", {compiled_graphs()} compiled graphs" if args.compile else ""
    return [{"check": "training", "setting": setting, "status": "ok",
             "real_tokens_per_s": per_s, "samples_per_s": samples / (end - start),
             "tflops": tflops, "mfu": tflops / peak if peak else None,
             "note": f"{args.steps - args.warmup} steps timed on {device_name()}{memory}, "
                     f"{args.optimizer}{graphs}"}]


def cm_gems(args) -> list[dict]:
    """A cm_gems run that must switch from genemask to global and export a model transformers
    loads. threshold 1e9 makes the second evaluation switch: what is checked is the machinery
    on this device (event, stage, checkpoints, export), not when a real run switches."""
    from transformers import AutoModelForMaskedLM

    setting = f"{args.model}, {args.steps} steps, {args.micro_batch_size} x {args.max_length}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, Path(tmp), eval_interval=args.eval_interval, eval_batches=2,
                          threshold=1e9, save_interval=args.steps // 2 or 1,
                          log_interval=max(1, args.steps // 10), run_name="gpu-check-cm-gems")
        t0 = time.perf_counter()
        result = Trainer(cfg).train()
        seconds = time.perf_counter() - t0
        export = Path(cfg.output_dir) / "export"
        switched = result.stage == "global" and len(result.events) == 1
        loads = AutoModelForMaskedLM.from_pretrained(export).config.vocab_size == 4101
        done = result.step == args.steps
    ok = switched and loads and done
    steps = [e["step"] for e in result.events]
    return [{"check": "cm_gems run", "setting": setting, "status": "ok" if ok else "FAILED",
             "note": f"switched genemask -> global at step {steps}, export loads: {loads}, "
                     f"{seconds:.0f} s on {device_name()}"}]
