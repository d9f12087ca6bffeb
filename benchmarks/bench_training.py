"""Training throughput on CPU: cmgems against the route a DNABERT user takes today, and the full
system against a bare PyTorch loop.

cmgems: the real Trainer (loader over the HDF5 shards, curriculum masking in the training process,
DeepSpeed engine, MLflow logging every --log-interval steps, the MLM head at the selected positions
only), padded and packed (cmgems.data.packing).

HF route: transformers.Trainer with DataCollatorForLanguageModeling and BertForMaskedLM, whose
vocabulary head runs at every position. Its masking is plain token masking: 15 % of tokens,
80/10/10 (DNABERT's 6-token spans need DNABERT's own collator; plain masking is the baseline taken
here). It trains on the same samples in the same order (the cmgems loader's first steps x batch
samples, given to the HF Trainer with its sequential sampler), padded to the longest sample of each
batch as its collator does, with the same model configuration, torch threads, loader workers and
optimizer settings, fp32, in this process right after the cmgems run.

Bare loop (LOGO, padded): the same model and loss as cmgems, torch AdamW, over batches loaded and
masked before the clock starts: what the system around the step costs.

Rows (--rows picks some; the HF route's eager fp32 row, the baseline of every ratio, always runs):
hf, hf-compile (the HF Trainer's own torch_compile=True), padded, packed, padded-compile,
packed-compile (cmgems' compile option), and with bf16: hf-bf16 (the HF Trainer's bf16=True,
CPU autocast), packed-bf16, packed-compile-bf16 (cmgems' precision bf16). By default: hf,
padded, packed, and where the CPU has bf16 hardware (AMX tiles or AVX512-BF16: torch.cpu's probes,
else the amx_bf16 / avx512_bf16 flags of /proc/cpuinfo) hf-bf16 and packed-bf16; the compile rows
on request (compiling buys nothing on a CPU: docs/performance.md). Ratios: to the HF route eager,
and to the HF route compiled where that row ran.

Real tokens are the non-pad tokens ([CLS] and [SEP] included) of each step's samples; real
tokens/s is the median over steps after --warmup of (real tokens of the step / its wall time, data
included), over --rounds runs of each system, the systems alternating so that a change of load on
a shared machine falls on all of them. Models: logo (GeneMask's LOGO) and dnabert4 (DNABERT's
BERT-base shape cut to 4 layers so that a CPU run stays short).

    python benchmarks/bench_training.py                       # logo and dnabert4, a few minutes
    python benchmarks/bench_training.py --rounds 3            # on a busy machine
    python benchmarks/bench_training.py --models logo --steps 20
    python benchmarks/bench_training.py --models dnabert4 --rows hf hf-compile packed packed-compile
"""
from __future__ import annotations

import argparse
import contextlib
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

from benchmarks.common import add_data_dir, ensure_data, markdown_table  # noqa: E402
from cmgems.model import architectures as models  # noqa: E402
from cmgems.pretrain.config import PretrainConfig  # noqa: E402
from cmgems.data.loader import SampleDataset, TrainBatches  # noqa: E402
from cmgems.masking.maskings import mask_batch  # noqa: E402
from cmgems.rng import generator  # noqa: E402
from cmgems.data.shards import ShardSet  # noqa: E402
from cmgems.data.tokens import write_vocab  # noqa: E402
from cmgems.pretrain.trainer import MaskedLM, Trainer  # noqa: E402

TARGET_VS_HF = 1.5      # cmgems real tokens/s over the HF route's
# row: (system, what the row sets in the config); "hf" is the baseline of every ratio
ROWS = {
    "hf": ("hf", {}),
    "hf-compile": ("hf", {"compile": True}),
    "padded": ("cmgems", {}),
    "packed": ("cmgems", {"packing": True}),
    "padded-compile": ("cmgems", {"compile": True}),
    "packed-compile": ("cmgems", {"packing": True, "compile": True}),
    "hf-bf16": ("hf", {"precision": "bf16"}),
    "packed-bf16": ("cmgems", {"packing": True, "precision": "bf16"}),
    "packed-compile-bf16": ("cmgems", {"packing": True, "compile": True, "precision": "bf16"}),
}
DEFAULT_ROWS = ("hf", "padded", "packed")
DEFAULT_BF16_ROWS = ("hf-bf16", "packed-bf16")
TARGET_VS_BARE = 1.10   # full-system step time over the bare loop's
# name: (cmgems model, layers; None keeps the architecture's own), default batch, steps
MODELS = {"logo": ("logo", None, 8, 10), "dnabert4": ("dnabert", 4, 4, 5)}


@contextlib.contextmanager
def architecture(name: str, layers: int | None):
    """cmgems' architecture `name`, cut to `layers` while the block runs (dnabert4)."""
    arch = models.ARCHITECTURES[name]
    saved = dict(arch)
    if layers is not None:
        arch["num_hidden_layers"] = layers
    try:
        yield models.bert_config(name, 6)
    finally:
        arch.clear()
        arch.update(saved)


def step_batches(cfg: PretrainConfig, steps: int) -> list[dict]:
    """The batches of the first `steps` steps (grad_accum 1), as cmgems' loader serves them."""
    shards = ShardSet(cfg.data_dir, "train")
    stream = TrainBatches(SampleDataset(shards, cfg.max_length), cfg.micro_batch_size, 0, 1,
                          cfg.seed, 0).from_position(0)
    return [next(stream) for _ in range(steps)]


def run_cmgems(cfg: PretrainConfig) -> list[float]:
    trainer = Trainer(cfg)
    trainer.train()
    return [t for t, _ in trainer.timings]


def run_hf(cfg: PretrainConfig, config, batches: list[dict], workers: int, tmp: Path
           ) -> list[float]:
    """Seconds per step of transformers' Trainer on the samples of `batches`, in their order;
    cfg.compile: its torch_compile=True, cfg.precision bf16: its bf16=True (CPU autocast)."""
    from transformers import (BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling,
                              Trainer as HFTrainer, TrainerCallback, TrainingArguments)

    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab_file=str(write_vocab(tmp / "vocab.txt", 6)),
                                  do_lower_case=False)
    samples = [{"input_ids": b["input_ids"][row, :n].tolist()}
               for b in batches for row, n in enumerate(b["lengths"].tolist())]

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

    torch.manual_seed(cfg.seed)
    clock = Clock()
    args = TrainingArguments(
        output_dir=str(tmp / "hf"), max_steps=len(batches),
        per_device_train_batch_size=cfg.micro_batch_size, learning_rate=cfg.lr,
        adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_epsilon=cfg.eps,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.grad_clip,
        train_sampling_strategy="sequential", dataloader_drop_last=True,
        dataloader_num_workers=workers, use_cpu=True, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=cfg.seed, torch_compile=cfg.compile,
        bf16=cfg.precision == "bf16")
    HFTrainer(model=BertForMaskedLM(config), args=args, train_dataset=samples,
              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
              callbacks=[clock]).train()
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def run_bare(cfg: PretrainConfig, batches: list[dict], vocab_size: int) -> list[float]:
    prepared = []
    for i, b in enumerate(batches):
        inputs, labels, _ = mask_batch(b["input_ids"], b["npmi"], b["attention_mask"], "genemask",
                                       vocab_size, generator(cfg.seed, i, 0, "mask"))
        prepared.append((inputs, b["attention_mask"], labels))
    torch.manual_seed(cfg.seed)
    model = MaskedLM(models.build_model(cfg.model, 6))
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


def cpu_bf16() -> str:
    """The CPU's bf16 hardware: "AMX" (matrix tiles), "AVX512-BF16" (vector dot products) or ""
    (none): torch's probes, else the kernel's cpuinfo flags."""
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pass
    for name, probe, flag in (("AMX", "_is_amx_tile_supported", "amx_bf16"),
                              ("AVX512-BF16", "_is_avx512_bf16_supported", "avx512_bf16")):
        found = getattr(torch.cpu, probe, None)
        if (found is not None and found()) or flag in flags:
            return name
    return ""


def default_rows() -> list[str]:
    return [*DEFAULT_ROWS, *(DEFAULT_BF16_ROWS if cpu_bf16() else ())]


def setting(row: str) -> str:
    """A row in words: layout, compile, precision."""
    system, extra = ROWS[row]
    layout = "" if system == "hf" else "packed" if extra.get("packing") else "padded"
    parts = [layout, "compiled" if extra.get("compile") else "eager",
             extra.get("precision", "fp32")]
    return ", ".join(p for p in parts if p)


def selected_share(batches: list[dict], cfg: PretrainConfig, vocab_size: int) -> float:
    """Share of real tokens cmgems' first stage (genemask) predicts: where its head runs."""
    picked = real = 0
    for i, b in enumerate(batches):
        _, _, selected = mask_batch(b["input_ids"], b["npmi"], b["attention_mask"], "genemask",
                                    vocab_size, generator(cfg.seed, i, 0, "mask"))
        picked += int(selected.sum())
        real += int(b["lengths"].sum())
    return picked / real


def child(args) -> None:
    """One system's run, cmgems or hf, in its own process (DeepSpeed's and accelerate's
    process-group set-ups do not share one): writes its seconds per step to --child-out."""
    name, system, layout = args.child
    cfg = PretrainConfig(**json.loads(args.child_config))
    arch, layers = MODELS[name][:2]
    with architecture(arch, layers) as config:
        if system == "cmgems":
            times = run_cmgems(cfg)
        else:
            times = run_hf(cfg, config, step_batches(cfg, cfg.max_steps), cfg.num_workers,
                           Path(cfg.output_dir))
    Path(args.child_out).write_text(json.dumps(times))


def timed(name: str, system: str, layout: str, cfg: dict, tmp: Path) -> list[float]:
    out = tmp / f"{name}-{system}-{layout}.json"
    subprocess.run([sys.executable, __file__, "--child", name, system, layout,
                    "--child-config", json.dumps(cfg), "--child-out", str(out)], check=True,
                   cwd=ROOT)
    return json.loads(out.read_text())


def bench_model(name: str, args, tmp: Path) -> list[dict]:
    arch, layers, default_bs, default_steps = MODELS[name]
    bs = args.micro_batch_size or default_bs
    steps = args.steps or default_steps
    warmup = min(args.warmup, steps - 1)
    base = dict(data_dir=args.data_dir, model=arch, mode="cm_gems", max_steps=steps,
                micro_batch_size=bs, grad_accum=1, max_length=args.max_length,
                eval_interval=10 ** 9, save_interval=10 ** 9, log_interval=args.log_interval,
                warmup_steps=10, num_workers=args.workers, eval_batches=1, packing=False)

    def rates(row: str, round_: int) -> list[float]:
        """Real tokens/s of each timed step of one run."""
        system, extra = ROWS[row]
        cfg = {**base, "output_dir": str(tmp / f"{name}-{row}-{round_}"), **extra}
        times = timed(name, system, row, cfg, tmp)
        return [n / t for n, t in zip(tokens[warmup:], times[warmup:])]

    with architecture(arch, layers) as config:
        cfg = PretrainConfig(**base)
        batches = step_batches(cfg, steps)
        tokens = [int(b["lengths"].sum()) for b in batches]
        slots = sum(b["input_ids"].numel() for b in batches)
        vocab_size = config.vocab_size
    rows = ["hf", *(r for r in args.rows if r != "hf")]
    per_step = {key: [] for key in [*rows, "bare"]}
    # Rounds alternate the systems, so a change of load on a shared machine falls on all of them.
    for round_ in range(args.rounds):
        for row in rows:
            per_step[row] += rates(row, round_)
        if name == "logo" and args.bare:   # no process group: it runs here
            with architecture(arch, layers):
                times = run_bare(PretrainConfig(**base), batches, vocab_size)
            per_step["bare"] += [n / t for n, t in zip(tokens[warmup:], times[warmup:])]
    median = {k: statistics.median(v) for k, v in per_step.items() if v}
    common = {"model": name, "batch": f"{bs} x {args.max_length}",
              "steps_timed": (steps - warmup) * args.rounds}
    out = []
    for row in rows:
        r = {**common, "row": row, "system": "HF Trainer" if ROWS[row][0] == "hf" else "cmgems",
             "setting": setting(row), "real_tokens_per_s": median[row],
             "ratio_vs_hf": median[row] / median["hf"]}
        if "hf-compile" in median:
            r["ratio_vs_hf_compile"] = median[row] / median["hf-compile"]
        out.append(r)
    out[0]["note"] = (f"padded real-token share {sum(tokens) / slots:.3f}; cmgems head at "
                      f"{selected_share(batches, PretrainConfig(**base), vocab_size):.3f} of "
                      f"real tokens")
    if "bare" in median and "padded" in median:
        out.append({**common, "row": "bare", "system": "bare PyTorch loop",
                    "setting": "padded, eager, fp32", "real_tokens_per_s": median["bare"],
                    "ratio_vs_hf": median["bare"] / median["hf"],
                    "full_over_bare_step": median["bare"] / median["padded"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_dir(p)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=0,
                   help="steps per system (0: per model, logo 10, dnabert4 5)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of every system, alternating; medians over all their steps")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="samples per step (0: per model, logo 8, dnabert4 4)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--workers", type=int, default=1, help="loader workers, both routes")
    p.add_argument("--log-interval", type=int, default=10, help="cmgems' MLflow log interval")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=default_rows(),
                   help="rows to run (hf, the baseline, always runs; the bf16 ones by "
                        "default where the CPU has bf16 hardware; here: %(default)s)")
    p.add_argument("--no-bare", dest="bare", action="store_false",
                   help="leave out the bare PyTorch loop (LOGO)")
    p.add_argument("--json", type=Path, help="also write the rows here as JSON")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    # cmgems' process-group set-up sets the thread count itself unless OMP_NUM_THREADS is set
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if args.child:
        return child(args)
    try:
        import accelerate  # noqa: F401  (transformers' Trainer needs it)
    except ImportError:
        raise SystemExit("error: the HF route (transformers' Trainer) needs accelerate: "
                         "pip install -e '.[bench]' (or 'accelerate>=1.1')") from None
    ensure_data(Path(args.data_dir))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    threads = torch.get_num_threads()
    print(f"training on the CPU, {threads} torch threads, {args.workers} loader worker(s), "
          f"{args.rounds} round(s), bf16 hardware: {cpu_bf16() or 'none'}, load average "
          f"{os.getloadavg()[0]:.2f}; HF route: transformers Trainer + "
          f"DataCollatorForLanguageModeling (plain token masking, 15 %) + BertForMaskedLM")
    print(markdown_table(rows, [
        ("model", "model", "{}"), ("batch", "batch", "{}"), ("system", "system", "{}"),
        ("setting", "setting", "{}"), ("real_tokens_per_s", "real tokens/s", "{:,.0f}"),
        ("ratio_vs_hf", "vs HF eager", "{:.2f}x"),
        ("ratio_vs_hf_compile", "vs HF compiled", "{:.2f}x"), ("note", "note", "{}")]))
    for model in args.models:
        ours = [r for r in rows if r["model"] == model and r["system"] == "cmgems"]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["ratio_vs_hf"])
        vs = [f"{best['ratio_vs_hf']:.2f}x the HF route eager"]
        if "ratio_vs_hf_compile" in best:
            vs.append(f"{best['ratio_vs_hf_compile']:.2f}x compiled")
        fair = best.get("ratio_vs_hf_compile", best["ratio_vs_hf"])
        print(f"target ({model}): cmgems' best setting ({best['setting']}) >= {TARGET_VS_HF}x "
              f"the HF route's real tokens/s: {', '.join(vs)} -> "
              f"{'ok' if min(best['ratio_vs_hf'], fair) >= TARGET_VS_HF else 'BELOW TARGET'}")
    bare = [r for r in rows if "full_over_bare_step" in r]
    if bare:
        r = bare[0]
        print(f"full system vs bare loop (logo, padded): step time ratio "
              f"{r['full_over_bare_step']:.3f} (target <= {TARGET_VS_BARE}) -> "
              f"{'ok' if r['full_over_bare_step'] <= TARGET_VS_BARE else 'BELOW TARGET'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
