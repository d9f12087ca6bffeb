"""Class predictions of a finetuned classifier: the logits of a sequence's windows averaged, then
softmax. Written as TSV: name, label, then one probability column per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmgems.errors import InputError
from cmgems.io import atomic_path
from cmgems.use.genome import Region
from cmgems.use.windows import LoadedModel, Windows, autocast, batches, progress_bar


def predict(loaded: LoadedModel, regions: list[Region], *, stride: int | None = None,
            batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(len(regions), classes) probabilities."""
    import torch
    stride = loaded.window if stride is None else stride
    if not 1 <= stride <= loaded.window:
        raise InputError(f"--stride {stride}: between 1 and the window ({loaded.window} tokens)")
    windows = Windows.of(regions, loaded.k, loaded.window, stride)
    classes = loaded.model.config.num_labels
    sums = torch.zeros(windows.n_sequences, classes, dtype=torch.float64, device=loaded.device)
    counts = torch.zeros(windows.n_sequences, dtype=torch.float64, device=loaded.device)
    owner = torch.from_numpy(windows.owner).to(loaded.device)
    # inference mode: no autograd graph is built or kept
    with torch.inference_mode(), \
            progress_bar(len(windows.tokens), "predict", "window", progress) as bar:
        for idx, ids, attention in batches(windows, batch_size, loaded.device):
            with autocast(loaded):
                logits = loaded.model(input_ids=ids, attention_mask=attention).logits
            rows = owner[torch.from_numpy(idx).to(loaded.device)]
            sums.index_add_(0, rows, logits.double())
            counts.index_add_(0, rows, torch.ones(len(idx), dtype=torch.float64,
                                                  device=loaded.device))
            bar.update(len(idx))
    return torch.softmax(sums / counts.unsqueeze(-1), dim=-1).float().cpu().numpy()


def labels(loaded: LoadedModel) -> list[str]:
    id2label = loaded.model.config.id2label or {}
    return [str(id2label.get(i, i)) for i in range(loaded.model.config.num_labels)]


def write_predictions(out: str | Path, probs: np.ndarray, regions: list[Region],
                      names: list[str]) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = probs.argmax(1)
    lines = ["\t".join(["name", "label", *(f"p_{n}" for n in names)])]
    lines += ["\t".join([r.name, names[b], *(f"{p:.6g}" for p in row)])
              for r, b, row in zip(regions, best, probs)]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return out
