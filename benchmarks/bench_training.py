"""Full-system training step vs a bare PyTorch loop, on CPU, LOGO.

Full system: the real Trainer (DataLoader over HDF5 shards, curriculum masking in the training
process, DeepSpeed engine, MLflow logging every --log-interval steps). Bare loop: the same model and
the same loss (vocabulary head at the selected positions only), torch AdamW, over batches loaded and
masked before the clock starts. Both run in this process, one after the other, with the same thread
count. Prints medians over steps (the first --warmup steps dropped), the ratio, and the
data + masking share of the full system's step time.

    python benchmarks/bench_training.py                     # LOGO, 8 x 512 tokens, 40 steps
    python benchmarks/bench_training.py --steps 60 --micro-batch-size 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cmgems.config import PretrainConfig  # noqa: E402
from cmgems.data import SampleDataset, TrainBatches  # noqa: E402
from cmgems.masking import mask_batch  # noqa: E402
from cmgems.models import build_model  # noqa: E402
from cmgems.rng import generator  # noqa: E402
from cmgems.shards import MANIFEST_NAME, ShardSet  # noqa: E402
from cmgems.trainer import MaskedLM, Trainer  # noqa: E402


def ensure_data(data_dir: Path) -> None:
    if not (data_dir / MANIFEST_NAME).is_file():
        subprocess.run([sys.executable, "-m", "preprocessing", "build",
                        str(ROOT / "data" / "ecoli_k12_mg1655.fa.gz"), str(data_dir)], cwd=ROOT,
                       check=True)


def full_system(cfg: PretrainConfig) -> list[tuple[float, float]]:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer.timings


def bare_loop(cfg: PretrainConfig, steps: int) -> list[float]:
    shards = ShardSet(cfg.data_dir, "train")
    batches = TrainBatches(SampleDataset(shards, cfg.max_length), cfg.micro_batch_size, 0, 1,
                           cfg.seed, 0).from_position(0)
    prepared = []
    for i in range(steps):
        b = next(batches)
        inputs, labels, _ = mask_batch(b["input_ids"], b["npmi"], b["attention_mask"], "genemask",
                                       shards.manifest.vocab_size, generator(cfg.seed, i, 0, "mask"))
        prepared.append((inputs, b["attention_mask"], labels))
    torch.manual_seed(cfg.seed)
    model = MaskedLM(build_model(cfg.model, shards.manifest.k))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, weight_decay=cfg.weight_decay)
    times = []
    for inputs, attn, labels in prepared:
        t0 = time.perf_counter()
        loss, _, _ = model(inputs, attn, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT / "data" / "ecoli_k12_mg1655"),
                   help="dataset to read (built from the bundled genome if missing)")
    p.add_argument("--steps", type=int, default=40, help="steps timed per system")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--log-interval", type=int, default=10, help="MLflow log every N steps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    ensure_data(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PretrainConfig(
            data_dir=str(data_dir), output_dir=str(Path(tmp) / "run"), model="logo",
            mode="cm_gems", max_steps=args.steps, micro_batch_size=args.micro_batch_size,
            grad_accum=1, max_length=args.max_length, eval_interval=10 ** 9,
            save_interval=10 ** 9, log_interval=args.log_interval, warmup_steps=10,
            num_workers=1, eval_batches=1)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        full = full_system(cfg)[args.warmup:]
        bare = bare_loop(cfg, args.steps)[args.warmup:]
    step_full = statistics.median(t for t, _ in full)
    step_bare = statistics.median(bare)
    data_share = statistics.median(d / t for t, d in full)
    ratio = step_full / step_bare
    result = {
        "model": "logo", "tokens_per_step": args.micro_batch_size * args.max_length,
        "threads": args.threads, "steps_timed": len(full),
        "full_system_step_s": round(step_full, 4), "bare_loop_step_s": round(step_bare, 4),
        "ratio": round(ratio, 3), "data_masking_share": round(data_share, 4),
        "target": "ratio <= 1.10, data+masking <= 2 %",
        "verdict": "ok" if ratio <= 1.10 and data_share <= 0.02 else "BELOW TARGET",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
