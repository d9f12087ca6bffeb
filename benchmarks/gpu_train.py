"""The Python side of benchmarks/gpu_check.sh: training throughput of the real Trainer, a cm_gems
run that must switch and export, and the one table the check prints. Each command writes rows
(JSON) that `table` joins; on a machine without CUDA the same code runs on the CPU (tiny sizes:
tests/test_gpu_check.py).

    python benchmarks/gpu_train.py train --model logo --packing off --json logo-padded.json
    python benchmarks/gpu_train.py cm-gems --json cm-gems.json
    python benchmarks/gpu_train.py table results/*.json [--out table.md]
    (row, pytest-row, loader-rows: the rows of gpu_check.sh's other steps)

train: --steps steps of the cmgems Trainer (packed: under --attention, the packed_attention
option; --compile: torch.compile) (DeepSpeed engine, masking on the device, MLflow),
timed from the end of step --warmup to the end of the last step with the device synchronised at
those two points only. Real tokens are the non-pad tokens ([CLS]/[SEP] included) of the timed
steps' samples; TFLOP/s = cmgems.model.architectures.flops_per_token (6 x parameters + attention, full MLM
head) x real tokens/s; MFU = that over the device's dense bf16 peak (cmgems.pretrain.trainer.PEAK_TFLOPS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_data_dir, ensure_data, markdown_table  # noqa: E402

# the packed attention paths, as the pretraining config names them (kept in step by a test)
PACKED_ATTENTION = ("auto", "sdpa", "torch_varlen", "flash_attn")

COLUMNS = [("check", "check", "{}"), ("setting", "setting", "{}"), ("status", "result", "{}"),
           ("real_tokens_per_s", "real tokens/s", "{:,.0f}"),
           ("samples_per_s", "samples/s", "{:,.0f}"), ("tflops", "TFLOP/s", "{:.1f}"),
           ("mfu", "MFU", "{:.1%}"), ("note", "note", "{}")]


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
    """Rows of bench_loader.py's --json output; loaders it could not measure as one row."""
    raw = json.loads(Path(args.raw).read_text())
    rows = [{"check": "loader", "setting": f"{r['loader']}, {r['workers']} workers",
             "status": "ok", "real_tokens_per_s": r["real_tokens_per_s"],
             "samples_per_s": r["samples_per_s"],
             "note": f"{r['ratio']:.1f}x the per-sample loader" if r.get("ratio") else ""}
            for r in raw if r.get("samples_per_s")]
    missing = sorted({r["loader"] for r in raw if not r.get("samples_per_s")})
    if missing:
        rows.append({"check": "loader", "setting": ", ".join(missing), "status": "not run",
                     "note": "no figure in bench_loader.py's output"})
    return rows


def table(args) -> None:
    rows = []
    for path in args.results:
        rows += json.loads(Path(path).read_text())
    if not args.device:
        from benchmarks.gpu_training import device_name
        args.device = device_name()
    text = (f"GPU check on {args.device}\n\n"
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
        add_data_dir(s)
        s.add_argument("--model", default="logo", choices=("logo", "dnabert"))
        s.add_argument("--steps", type=int, default=40 if name == "train" else 300)
        s.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
        s.add_argument("--micro-batch-size", type=int, default=64)
        s.add_argument("--max-length", type=int, default=512)
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--precision", default=None,
                       help="bf16 where CUDA is available, else fp32 (default)")
        s.add_argument("--ds-config", default="", help="DeepSpeed JSON instead of ds_configs/")
        s.add_argument("--packing", choices=("on", "off"), default="off")
        s.add_argument("--attention", default="auto", choices=tuple(PACKED_ATTENTION),
                       help="packed_attention of a packed run (a path this machine cannot run "
                            "gives a skipped row)")
        s.add_argument("--compile", action="store_true", help="torch.compile the model")
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
    from benchmarks import gpu_training   # torch, transformers, DeepSpeed: only to train
    if args.precision is None:
        args.precision = "bf16" if gpu_training.torch.cuda.is_available() else "fp32"
    rows = (gpu_training.train if args.command == "train" else gpu_training.cm_gems)(args)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
