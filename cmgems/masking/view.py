"""What a masking selects on real samples: the positions each strategy would have the model
predict (before the 80/10/10 corruption), for the first samples of a dataset's split.

`cmgems masks` prints them and draws them; pretraining logs the same picture of 4 validation
samples to MLflow when it starts, so a run's masking can be seen before its numbers are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmgems.data.layout import DatasetDir
from cmgems.data.loader import SampleDataset
from cmgems.data.npmi_table import load_table
from cmgems.data.shards import ShardSet
from cmgems.errors import InputError
from cmgems.masking.maskings import select
from cmgems.masking.names import MASKINGS, check_masking
from cmgems.rng import generator


@dataclass
class Selection:
    """One sample under one masking: token indices ([CLS] = 0), its real tokens with [CLS] and
    [SEP], the NPMI of each of them (NaN: special or unscored) and the selected indices."""
    strategy: str
    sample: int
    length: int
    npmi: np.ndarray
    selected: list[int]

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "sample": self.sample, "length": self.length,
                "selected": self.selected}


def selections(data_dir, strategies=MASKINGS, *, split: str = "valid", samples: int = 4,
               seed: int = 0, max_length: int = 512, pmi_lookup: str = "token",
               probabilities: dict[str, float] | None = None, global_m: int | str = 0,
               genemask_anchor_order: str = "top") -> list[Selection]:
    """The selections of `strategies` on the first `samples` samples of `split`, cut to
    `max_length` tokens as training cuts them; each strategy's draws from its own generator of
    `seed`, so adding a strategy changes no other's picks."""
    for s in strategies:
        check_masking(s)
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    if max_length < 3:
        raise InputError(f"--max-length must be >= 3 ([CLS], a token, [SEP]), got {max_length}")
    shards = ShardSet(data_dir, split)
    n = min(samples, len(shards))
    batch = SampleDataset(shards, max_length).batch(np.arange(n))
    k = shards.manifest.k
    table = torch.from_numpy(load_table(DatasetDir(data_dir).npmi_table, k))
    lengths = batch["attention_mask"].sum(1)
    out = []
    for strategy in strategies:
        chosen = select(strategy, batch["input_ids"], batch["npmi"], batch["attention_mask"],
                        generator(seed, 0, 0, f"masks-{strategy}"), k=k,
                        mlm_probability=(probabilities or {}).get(strategy), global_m=global_m,
                        pmi_lookup=pmi_lookup, npmi_table=table,
                        genemask_anchor_order=genemask_anchor_order)
        for i in range(n):
            length = int(lengths[i])
            out.append(Selection(strategy, i, length, batch["npmi"][i, :length].numpy(),
                                 torch.nonzero(chosen[i]).flatten().tolist()))
    return out


def spans(selected: list[int]) -> str:
    """1-6, 40-45: the selected indices as runs, for a terminal."""
    if not selected:
        return "-"
    idx = np.asarray(selected)
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))
