"""One vector per sequence: the encoder's last hidden states pooled over each window (mean over
its real k-mer tokens, or the [CLS] vector), then over a sequence's windows weighted by their
tokens. Written to HDF5: `embeddings` (n x hidden, float32) and `names`, with the model's path
and weights hash as attributes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.io import atomic_path
from cmgems.use.genome import Region
from cmgems.use.windows import LoadedModel, Windows, autocast, batches, progress_bar

POOLS = ("mean", "cls")


def embed(loaded: LoadedModel, regions: list[Region], *, pool: str = "mean",
          stride: int | None = None, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(len(regions), hidden) float32 embeddings."""
    import torch
    if pool not in POOLS:
        raise InputError(f"--pool {pool!r}: one of {', '.join(POOLS)}")
    stride = loaded.window if stride is None else stride
    if not 1 <= stride <= loaded.window:
        raise InputError(f"--stride {stride}: between 1 and the window ({loaded.window} tokens)")
    windows = Windows.of(regions, loaded.k, loaded.window, stride)
    hidden = loaded.model.config.hidden_size
    sums = torch.zeros(windows.n_sequences, hidden, dtype=torch.float64, device=loaded.device)
    weights = torch.zeros(windows.n_sequences, dtype=torch.float64, device=loaded.device)
    owner = torch.from_numpy(windows.owner).to(loaded.device)
    # inference mode: no autograd graph is built or kept
    with torch.inference_mode(), \
            progress_bar(len(windows.tokens), "embed", "window", progress) as bar:
        for idx, ids, attention in batches(windows, batch_size, loaded.device):
            with autocast(loaded):
                states = loaded.model(input_ids=ids, attention_mask=attention).last_hidden_state
            states = states.float()
            # the real k-mer tokens: attended, and neither [CLS] (column 0) nor [SEP] (last one)
            real = attention.clone()
            real[:, 0] = 0
            real[torch.arange(len(real), device=real.device), attention.sum(1) - 1] = 0
            n_real = real.sum(1).double()
            if pool == "mean":
                vec = (states * real.unsqueeze(-1)).sum(1).double() / n_real.unsqueeze(-1)
            else:
                vec = states[:, 0].double()
            rows = owner[torch.from_numpy(idx).to(loaded.device)]
            sums.index_add_(0, rows, vec * n_real.unsqueeze(-1))
            weights.index_add_(0, rows, n_real)
            bar.update(len(idx))
    return (sums / weights.unsqueeze(-1)).float().cpu().numpy()


def write_embeddings(out: str | Path, vectors: np.ndarray, regions: list[Region],
                     loaded: LoadedModel, pool: str, stride: int) -> Path:
    """The HDF5 file, written whole or not at all."""
    import h5py
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=vectors.astype(np.float32))
        f.create_dataset("names", data=np.array([r.name for r in regions], dtype=object),
                         dtype=h5py.string_dtype())
        f.attrs.update({"model": str(loaded.path.resolve()), "model_sha256": loaded.sha256,
                        "k": loaded.k, "pool": pool, "window": loaded.window,
                        "stride": stride, "precision": loaded.precision})
    return out
