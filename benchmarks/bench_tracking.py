"""What the export's tokenizer and the MLflow extras of a run cost, on this machine.

- tokenizer: raw DNA -> ids with DNAKmerTokenizer (vectorized codes; transformers' API still
  makes one string per token), against string k-mers with dict lookups in plain Python and
  against DNABERT's way (k-mer text, then transformers' BertTokenizer), on the same sequence;
- log_hf_model: logging a LOGO export as an MLflow transformers model (the first call imports
  mlflow.transformers, as a run's first export does; the second is what each later one costs);
- system metrics: CPU seconds MLflow's monitor spends per sample, and the share of one core that
  makes at its 10 s default interval.

    python benchmarks/bench_tracking.py
    python benchmarks/bench_tracking.py --bases 2000000 --samples 30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def tokenizer_rates(bases: int) -> dict:
    from cmgems.model.tokenizer import DNAKmerTokenizer
    from cmgems.data.tokens import kmerize, vocab, write_vocab
    seq = "".join(np.random.default_rng(0).choice(list("ACGTN"), bases, p=[.24] * 4 + [.04]))
    tok = DNAKmerTokenizer(k=6)
    t0 = time.perf_counter()
    ids = tok(seq, add_special_tokens=False)["input_ids"]
    fast = time.perf_counter() - t0
    index = {t: i for i, t in enumerate(vocab(6))}
    t0 = time.perf_counter()
    ref = [index.get(seq[i:i + 6], 1) for i in range(len(seq) - 5)]
    slow = time.perf_counter() - t0
    assert ids == ref
    # what a DNABERT user runs: k-mer text (train.py's --kmer 6), then BertTokenizer on vocab.txt
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import BertTokenizer
        write_vocab(Path(tmp) / "vocab.txt", 6)
        bert = BertTokenizer(vocab=str(Path(tmp) / "vocab.txt"), do_lower_case=False)
        t0 = time.perf_counter()
        got = bert(kmerize(seq, 6), add_special_tokens=False)["input_ids"]
        dnabert = time.perf_counter() - t0
    assert got == ref
    return {"bases": bases, "tokenizer_mbp_per_s": bases / fast / 1e6,
            "python_kmers_mbp_per_s": bases / slow / 1e6,
            "kmer_text_bert_tokenizer_mbp_per_s": bases / dnabert / 1e6}


def log_model_seconds(tmp: Path) -> dict:
    from transformers import BertForMaskedLM

    from cmgems.model.architectures import bert_config, export
    from cmgems.tracking.tracker import Tracker
    from cmgems.tracking.uri import resolve_tracking_uri
    config = bert_config("logo", 6)
    model_dir = export(BertForMaskedLM(config).state_dict(), config, tmp / "export")
    tracker = Tracker(True, resolve_tracking_uri(tmp / "runs"), "bench", "log-model")
    times = []
    for i in range(2):
        t0 = time.perf_counter()
        if tracker.log_hf_model(model_dir, name=f"model-{i}") is None:
            raise SystemExit("log_hf_model failed (see the warning above)")
        times.append(time.perf_counter() - t0)
    tracker.finish()
    return {"log_model_first_s": times[0], "log_model_next_s": times[1]}


def system_metrics_cost(tmp: Path, samples: int) -> dict:
    from cmgems.tracking.tracker import Tracker
    from cmgems.tracking.uri import resolve_tracking_uri
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    tracker = Tracker(True, resolve_tracking_uri(tmp / "runs"), "bench", "system-metrics")
    t0, c0 = time.perf_counter(), time.process_time()
    tracker.start_system_metrics()
    time.sleep(samples)
    tracker.finish()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    per_sample = cpu / samples
    return {"system_metrics_samples": samples, "cpu_s_per_sample": per_sample,
            "core_share_at_10s": per_sample / 10, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=20, help="system metrics samples, 1 s apart")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = {**tokenizer_rates(args.bases), **log_model_seconds(Path(tmp)),
               **system_metrics_cost(Path(tmp), args.samples)}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()},
                     indent=2))


if __name__ == "__main__":
    main()
