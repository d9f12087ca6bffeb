"""Class predictions of a finetuned classifier: the logits of a sequence's windows averaged, then
softmax. Written as TSV: name, label, then one probability column per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmgems.io import atomic_path
from cmgems.use.genome import Region
from cmgems.use.windows import LoadedModel, mean_over_windows


def predict(loaded: LoadedModel, regions: list[Region], *, stride: int | None = None,
            batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(len(regions), classes) probabilities."""
    import torch

    def forward(ids, attention):
        logits = loaded.model(input_ids=ids, attention_mask=attention).logits
        return logits.float(), torch.ones(len(ids), device=logits.device)

    # a long sequence's windows: the mean of their logits, then the softmax
    logits = mean_over_windows(loaded, regions, stride, batch_size, progress, "predict",
                               loaded.model.config.num_labels, forward)
    return torch.softmax(logits, dim=-1).float().cpu().numpy()


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
