"""Sequences to model inputs: overlapping k-mer ids, cut into windows the model can take, and run
in batches (sorted by length, so a batch pads little), with the device and precision chosen once.

A sequence of L bases is L - k + 1 k-mer tokens; a window holds at most `window` of them (the
model's block less [CLS] and [SEP]). Windows start every `stride` tokens and the last one ends at
the sequence's end, so every token lies in at least one window.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID, k_from_vocab_size, kmer_ids
from cmgems.errors import InputError
from cmgems.io import sha256_file
from cmgems.use.genome import Region

log = logging.getLogger("cmgems.use")


def window_starts(n_tokens: int, window: int, stride: int) -> np.ndarray:
    """First token of each window over n_tokens tokens: 0, stride, ..., and n_tokens - window."""
    if n_tokens <= window:
        return np.zeros(1, dtype=np.int64)
    last = n_tokens - window
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    return starts if starts[-1] == last else np.append(starts, last)


@dataclass
class Windows:
    """Every window of a list of sequences: its tokens, and which sequence it belongs to."""
    tokens: list[np.ndarray]
    owner: np.ndarray          # sequence index of each window
    n_sequences: int

    @classmethod
    def of(cls, regions: list[Region], k: int, window: int, stride: int) -> Windows:
        tokens, owner = [], []
        for i, r in enumerate(regions):
            ids = kmer_ids(r.seq, k)
            for s in window_starts(len(ids), window, stride):
                tokens.append(ids[s:s + window])
                owner.append(i)
        return cls(tokens, np.asarray(owner, dtype=np.int64), len(regions))

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))


@dataclass
class LoadedModel:
    """A model directory's model on its device, with what the commands write about it."""
    path: Path
    model: object
    k: int
    window: int                # k-mer tokens per window ([CLS], [SEP] not counted)
    device: object
    precision: str
    sha256: str
    meta: dict


def _meta(path: Path) -> dict:
    f = path / "cmgems.json"
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:
        raise InputError(f"{f}: not JSON ({e})") from None
    return meta if isinstance(meta, dict) else {}


def trained_block(meta: dict) -> int | None:
    """The block length (tokens, specials included) the model was trained on: the export's, or
    for a finetuned model the one it was finetuned from."""
    for m in (meta, meta.get("base") or {}):
        if isinstance(m, dict) and isinstance(m.get("max_length"), int):
            return m["max_length"]
    return None


def load_model(model_dir: str | Path, kind: str, *, window: int | None = None,
               device: str = "auto", precision: str = "auto") -> LoadedModel:
    """The model of `model_dir` for `kind` ("base": the encoder, "mlm": with the masked-LM head,
    "classifier": a finetuned sequence classifier), in eval mode on `device` ('auto': the GPU
    where there is one). window: tokens per window; default the block the model was trained on
    (cmgems.json's max_length) less the two specials, at most its position embeddings."""
    from transformers import (
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    from cmgems.evaluation.finetune import _device, resolve_precision
    from cmgems.model.architectures import check_model_dir
    path = Path(model_dir)
    config, weights = check_model_dir(path)
    try:
        k = k_from_vocab_size(config.vocab_size)
    except ValueError as e:
        raise InputError(f"{path / 'config.json'}, field vocab_size: {e}") from None
    meta = _meta(path)
    if kind == "classifier" and not (config.architectures or [""])[0].endswith(
            "ForSequenceClassification"):
        raise InputError(f"{path}: not a finetuned classifier (config.json architectures "
                         f"{config.architectures}); `cmgems finetune ... --save-model DIR` "
                         f"writes one")
    limit = config.max_position_embeddings - 2
    if window is None:
        block = trained_block(meta)
        window = min(block - 2, limit) if block else limit
    if not 1 <= window <= limit:
        raise InputError(f"--window {window}: the model takes 1..{limit} k-mer tokens "
                         f"({config.max_position_embeddings} positions less [CLS] and [SEP])")
    loader = {"base": AutoModel, "mlm": AutoModelForMaskedLM,
              "classifier": AutoModelForSequenceClassification}[kind]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the MLM head an encoder-only load drops is expected
    try:
        model = loader.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - safetensors, torch.load and transformers each differ
        raise InputError(f"{weights}: cannot load the model ({' '.join(str(e).split())[:300]})") \
            from None
    finally:
        hf_logging.set_verbosity(verbosity)
    dev = _device(device)
    model.to(dev).eval()
    prec = resolve_precision(precision, dev)
    return LoadedModel(path, model, k, int(window), dev, prec, sha256_file(weights), meta)


def batches(windows: Windows, batch_size: int, device):
    """(window indices, input_ids, attention_mask) batches, windows sorted by length so padding
    is small; the order is fixed by the lengths alone (stable sort), so a run repeats exactly."""
    import torch
    lengths = windows.lengths()
    order = np.argsort(lengths, kind="stable")
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = int(lengths[idx].max()) + 2
        ids = np.full((len(idx), width), PAD_ID, dtype=np.int64)
        ids[:, 0] = CLS_ID
        for row, i in enumerate(idx):  # one slice copy per window, not per position
            n = lengths[i]
            ids[row, 1:n + 1] = windows.tokens[i]
            ids[row, n + 1] = SEP_ID
        ids_t = torch.from_numpy(ids).to(device)
        yield idx, ids_t, (ids_t != PAD_ID).long()


class _Quiet:
    """A progress display that shows nothing (progress=False: benchmarks, library callers)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, show: bool):
    """cmgems.progress's bar (or plain lines every 10 s in a log) when `show`, else nothing."""
    from cmgems.progress import Progress
    return Progress(total, desc, unit=unit, seconds=10) if show else _Quiet()


def autocast(loaded: LoadedModel):
    from cmgems.evaluation.finetune import _autocast
    return _autocast(loaded.device, loaded.precision)


def mean_over_windows(loaded: LoadedModel, regions: list[Region], stride: int | None,
                      batch_size: int, progress: bool, desc: str, width: int, forward):
    """Every window of `regions` through `forward(ids, attention) -> (vectors [b, width],
    weights [b])`, in batches; returns each region's weighted mean of its windows' vectors
    (float64 [len(regions), width], on the model's device)."""
    import torch
    stride = loaded.window if stride is None else stride
    if not 1 <= stride <= loaded.window:
        raise InputError(f"--stride {stride}: between 1 and the window ({loaded.window} tokens)")
    windows = Windows.of(regions, loaded.k, loaded.window, stride)
    sums = torch.zeros(windows.n_sequences, width, dtype=torch.float64, device=loaded.device)
    weights = torch.zeros(windows.n_sequences, dtype=torch.float64, device=loaded.device)
    owner = torch.from_numpy(windows.owner).to(loaded.device)
    # inference mode: no autograd graph is built or kept
    with torch.inference_mode(), \
            progress_bar(len(windows.tokens), desc, "window", progress) as bar:
        for idx, ids, attention in batches(windows, batch_size, loaded.device):
            with autocast(loaded):
                vectors, weight = forward(ids, attention)
            rows = owner[torch.from_numpy(idx).to(loaded.device)]
            sums.index_add_(0, rows, vectors.double() * weight.double().unsqueeze(-1))
            weights.index_add_(0, rows, weight.double())
            bar.update(len(idx))
    return sums / weights.unsqueeze(-1)
