"""The Python side of benchmarks/gpu_check.sh: training throughput of the real Trainer, a cm_gems
run that must switch and export, and the one table the check prints. Each command writes rows
(JSON) that `table` joins; on a machine without CUDA the same code runs on the CPU (tiny sizes:
tests/test_gpu_check.py).

    python benchmarks/gpu_train.py train --model logo --packing off --json logo-padded.json
    python benchmarks/gpu_train.py cm-gems --json cm-gems.json
    python benchmarks/gpu_train.py table results/*.json [--out table.md]
    (row, pytest-row, loader-rows: the rows of gpu_check.sh's other steps)

train: --steps steps of the cmgems Trainer (DeepSpeed engine, masking on the device, MLflow),
timed from the end of step --warmup to the end of the last step with the device synchronised at
those two points only. Real tokens are the non-pad tokens ([CLS]/[SEP] included) of the timed
steps' samples; TFLOP/s = cmgems.models.flops_per_token (6 x parameters + attention, full MLM
head) x real tokens/s; MFU = that over the device's dense bf16 peak (cmgems.trainer.PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import ensure_data, markdown_table  # noqa: E402
from cmgems.config import PretrainConfig  # noqa: E402
from cmgems.data import SampleDataset, TrainBatches  # noqa: E402
from cmgems.models import flops_per_token  # noqa: E402
from cmgems.shards import ShardSet  # noqa: E402
from cmgems.trainer import Trainer, peak_tflops  # noqa: E402

HAS_PACKING = "packing" in {f.name for f in dataclasses.fields(PretrainConfig)}
COLUMNS = [("check", "check", "{}"), ("setting", "setting", "{}"), ("status", "result", "{}"),
           ("real_tokens_per_s", "real tokens/s", "{:,.0f}"),
           ("samples_per_s", "samples/s", "{:,.0f}"), ("tflops", "TFLOP/s", "{:.1f}"),
           ("mfu", "MFU", "{:.1%}"), ("note", "note", "{}")]


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


def optimizer_config(args, tmp: Path) -> tuple[str, str]:
    """(ds_config, optimizer in words). DeepSpeed's fused Adam is compiled at the first CUDA run
    unless it came prebuilt; without CUDA build tools (nvcc) that fails, so the check then runs
    with torch's AdamW (`torch_adam`) rather than not at all."""
    if args.ds_config:
        return args.ds_config, f"optimizer of {args.ds_config}"
    if not torch.cuda.is_available():
        return "", "torch AdamW (DeepSpeed on CPU)"
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    if installed_ops.get("fused_adam") or CUDA_HOME is not None:
        return "", "DeepSpeed fused Adam"
    config = json.loads((ROOT / "ds_configs" / "zero0.json").read_text())
    config["optimizer"].setdefault("params", {})["torch_adam"] = True
    path = tmp / "zero0-torch-adam.json"
    path.write_text(json.dumps(config))
    return str(path), "torch AdamW (no nvcc for DeepSpeed's fused Adam)"


def base_config(args, tmp: Path, **over) -> PretrainConfig:
    values = dict(data_dir=args.data_dir, output_dir=str(tmp / "run"), model=args.model,
                  mode="cm_gems", max_steps=args.steps, micro_batch_size=args.micro_batch_size,
                  grad_accum=1, max_length=args.max_length, eval_interval=10 ** 9,
                  save_interval=10 ** 9, log_interval=10 ** 9, warmup_steps=10,
                  num_workers=args.workers, eval_batches=1, precision=args.precision,
                  run_name=f"gpu-check-{args.model}")
    values["ds_config"], args.optimizer = optimizer_config(args, tmp)
    values.update(over)
    return PretrainConfig(**values)


def train(args) -> list[dict]:
    setting = (f"{args.model}, {args.packing_label}, {args.micro_batch_size} x {args.max_length}, "
               f"{args.precision}")
    if args.packing == "on" and not HAS_PACKING:
        return [{"check": "training", "setting": setting, "status": "not run",
                 "note": "no `packing` config field in this branch"}]
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"packing": args.packing == "on"} if HAS_PACKING else {}
        cfg = base_config(args, Path(tmp), **extra)
        counts = step_tokens(cfg)
        trainer = TimedTrainer(cfg)
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
    return [{"check": "training", "setting": setting, "status": "ok",
             "real_tokens_per_s": per_s, "samples_per_s": samples / (end - start),
             "tflops": tflops, "mfu": tflops / peak if peak else None,
             "note": f"{args.steps - args.warmup} steps timed on {device_name()}{memory}, "
                     f"{args.optimizer}"}]


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
        switched = result["stage"] == "global" and len(result["events"]) == 1
        loads = AutoModelForMaskedLM.from_pretrained(export).config.vocab_size == 4101
        done = result["step"] == args.steps
    ok = switched and loads and done
    steps = [e["step"] for e in result["events"]]
    return [{"check": "cm_gems run", "setting": setting, "status": "ok" if ok else "FAILED",
             "note": f"switched genemask -> global at step {steps}, export loads: {loads}, "
                     f"{seconds:.0f} s on {device_name()}"}]


def pytest_row(args) -> list[dict]:
    """The row of a pytest run, from its JUnit XML: passed, failed, skipped counts."""
    import xml.etree.ElementTree as ET

    try:
        suites = ET.parse(args.junit).getroot()
    except (OSError, ET.ParseError) as e:
        return [{"check": args.check, "setting": args.setting, "status": "FAILED",
                 "note": f"no test report ({e})"}]
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    bad = n["failures"] + n["errors"]
    status = "FAILED" if bad else "ok" if passed else "skipped"
    return [{"check": args.check, "setting": args.setting, "status": status,
             "note": f"{passed} passed, {bad} failed, {n['skipped']} skipped"}]


def loader_rows(args) -> list[dict]:
    """Rows of bench_loader.py's --json output; loaders it could not measure (packing before
    cmgems/packing.py is merged) as one row."""
    raw = json.loads(Path(args.raw).read_text())
    rows = [{"check": "loader", "setting": f"{r['loader']}, {r['workers']} workers",
             "status": "ok", "real_tokens_per_s": r["real_tokens_per_s"],
             "samples_per_s": r["samples_per_s"],
             "note": f"{r['ratio']:.1f}x the per-sample loader" if r.get("ratio") else ""}
            for r in raw if r.get("samples_per_s")]
    missing = sorted({r["loader"] for r in raw if not r.get("samples_per_s")})
    if missing:
        rows.append({"check": "loader", "setting": ", ".join(missing), "status": "not run",
                     "note": "cmgems/packing.py not in this branch"})
    return rows


def table(args) -> None:
    rows = []
    for path in args.results:
        rows += json.loads(Path(path).read_text())
    text = (f"GPU check on {args.device or device_name()}\n\n"
            + markdown_table(rows, COLUMNS) + "\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "cm-gems"):
        s = sub.add_parser(name)
        s.add_argument("--data-dir", default=str(ROOT / "data" / "ecoli_k12_mg1655"),
                       help="dataset (built from the bundled genome if missing)")
        s.add_argument("--model", default="logo", choices=("logo", "dnabert"))
        s.add_argument("--steps", type=int, default=40 if name == "train" else 300)
        s.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
        s.add_argument("--micro-batch-size", type=int, default=64)
        s.add_argument("--max-length", type=int, default=512)
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
        s.add_argument("--ds-config", default="", help="DeepSpeed JSON instead of ds_configs/")
        s.add_argument("--packing", choices=("on", "off"), default="off")
        s.add_argument("--eval-interval", type=int, default=50)
        s.add_argument("--json", type=Path, required=True, help="write the rows here")
    r = sub.add_parser("row", help="one row, e.g. a check that failed")
    for name in ("--check", "--status", "--setting", "--note"):
        r.add_argument(name, default="")
    r.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("pytest-row", help="the row of a pytest run's JUnit XML")
    r.add_argument("junit")
    r.add_argument("--check", required=True)
    r.add_argument("--setting", default="")
    r.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("loader-rows", help="rows of bench_loader.py --json output")
    r.add_argument("raw")
    r.add_argument("--json", type=Path, required=True)
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+", help="JSON rows written by the other commands")
    t.add_argument("--out", help="also write the table here")
    t.add_argument("--device", help="device name for the heading (default: this machine's)")
    args = p.parse_args()
    if args.command == "table":
        return table(args)
    if args.command in ("row", "pytest-row", "loader-rows"):
        rows = ([{k: getattr(args, k) or None for k in ("check", "setting", "status", "note")}]
                if args.command == "row" else
                pytest_row(args) if args.command == "pytest-row" else loader_rows(args))
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return None
    os.environ.pop("MLFLOW_TRACKING_URI", None)   # the run's own store, in its temp directory
    ensure_data(Path(args.data_dir))
    args.packing_label = "packed" if args.packing == "on" else "padded"
    if not 1 <= args.warmup < args.steps:
        raise SystemExit(f"error: --warmup {args.warmup} must be in 1..--steps - 1 "
                         f"({args.steps - 1})")
    rows = train(args) if args.command == "train" else cm_gems(args)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
