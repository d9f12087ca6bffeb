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
from cmgems.use.windows import LoadedModel, mean_over_windows

POOLS = ("mean", "cls")


def embed(loaded: LoadedModel, regions: list[Region], *, pool: str = "mean",
          stride: int | None = None, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(len(regions), hidden) float32 embeddings."""
    import torch
    if pool not in POOLS:
        raise InputError(f"--pool {pool!r}: one of {', '.join(POOLS)}")

    def forward(ids, attention):
        states = loaded.model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        # the real k-mer tokens: attended, and neither [CLS] (column 0) nor [SEP] (last one)
        real = attention.clone()
        real[:, 0] = 0
        real[torch.arange(len(real), device=real.device), attention.sum(1) - 1] = 0
        n_real = real.sum(1)
        if pool == "mean":
            return (states * real.unsqueeze(-1)).sum(1) / n_real.unsqueeze(-1), n_real
        return states[:, 0], n_real  # windows weighted by their tokens either way

    means = mean_over_windows(loaded, regions, stride, batch_size, progress, "embed",
                              loaded.model.config.hidden_size, forward)
    return means.float().cpu().numpy()


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
