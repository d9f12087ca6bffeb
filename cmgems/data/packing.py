"""Sequence packing: the samples of a micro-batch laid back to back ([CLS] s1 [SEP] [CLS] s2 [SEP]
...) into as few rows as they fit, so the model computes on real tokens instead of [PAD].

Masking never sees the packed layout: it runs per sample on the padded batch, as without packing
(spans stay inside their sample, GLOBAL's m counts the sample's own tokens, [CLS]/[SEP] are never
chosen), and only its result (inputs and labels) is moved into the packed rows. The samples, the
predicted positions and their labels are therefore exactly those of the unpacked step.

The plan (which row and offset each sample takes) is computed on the CPU from the samples'
lengths, before the batch goes to the device: no device value is read back to pack. On the device
packing is one gather and one scatter with the plan's index tensors.

Attention never crosses samples, and position ids restart at 0 in every sample (token type ids stay
0): with SDPA through a block-diagonal [rows, 1, width, width] boolean mask over rows of at most
max_length; with flash-attention 2 through its variable-length kernel, given the samples'
cumulative lengths over one row that holds every sample (no padding at all). choose_attention
picks the path at start-up (docs/pretraining.md, "Packing").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmgems.masking.maskings import IGNORE_INDEX
from cmgems.data.tokens import PAD_ID

log = logging.getLogger("cmgems")

SDPA, VARLEN = "sdpa", "varlen"  # the two packed attention paths


def sample_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens per sample, [CLS] and [SEP] included (int64 [B], on the batch's device): the loader's
    `lengths` where it delivers them, else the attention mask's row sums."""
    if "lengths" in batch:
        return batch["lengths"].to(torch.int64)
    return batch["attention_mask"].sum(1, dtype=torch.int64)


def first_fit(lengths: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """(row, offset) of every sample and each row's fill: samples in data order, each into the
    first row that still has room for it whole, a new row when none has."""
    rows, offsets, fill = [], [], []
    for n in lengths:  # one pass over the samples (tens), never over positions
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a row of {capacity}")
        for r, used in enumerate(fill):
            if used + n <= capacity:
                break
        else:
            r = len(fill)
            fill.append(0)
        rows.append(r)
        offsets.append(fill[r])
        fill[r] += n
    return rows, offsets, fill


@dataclass
class Layout:
    """Where the tokens of a padded [B, W] batch go in the model's input. `plan` is None for the
    padded layout itself (packing off)."""
    samples: int
    real_tokens: int             # tokens of the samples, [CLS]/[SEP] included
    slots: int                   # positions the model computes: rows x width
    plan: dict[str, torch.Tensor] | None = None
    rows: int = 0
    width: int = 0
    max_seqlen: int = 0          # the longest sample, with plan["cu_seqlens"] (varlen path)

    @property
    def real_token_share(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0


def plan(lengths: torch.Tensor, padded_width: int, capacity: int,
         narrow: bool = True) -> Layout:
    """The packed layout of samples with these lengths (int64 [B], CPU) in a padded batch of
    `padded_width` columns: first-fit into rows of `capacity` positions, or (`narrow`) into rows
    as wide as the longest sample where that computes no more positions (short samples only:
    three of 30 in rows of 64 would be two rows of 60, more than three rows of 30), so a packed
    batch never computes more positions than the padded one, and at equal positions takes the
    narrower rows (attention grows with the square of the width). The row width is the fullest
    row's fill.

    Index arrays are built with numpy on the CPU, vectorized over tokens (several times faster
    than torch at these sizes)."""
    n = lengths.to("cpu", torch.int64).numpy()
    b = len(n)
    longest = int(n.max()) if b else 0
    if longest > padded_width:
        raise ValueError(f"a sample of {longest} tokens in a batch of width {padded_width}")
    as_list = n.tolist()
    widths = (capacity, longest) if narrow and 0 < longest < capacity else (capacity,)
    fits = [first_fit(as_list, c) for c in widths]
    rows, offsets, fill = min(fits, key=lambda f: (len(f[2]) * max(f[2], default=0),
                                                   max(f[2], default=0)))
    n_rows, width, total = len(fill), max(fill, default=0), int(n.sum())
    within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)     # position inside its sample
    src = np.repeat(np.arange(b) * padded_width, n) + within
    dst = np.repeat(np.asarray(rows, np.int64) * width + np.asarray(offsets, np.int64), n) + within
    position_ids = np.zeros(n_rows * width, np.int64)
    position_ids[dst] = within
    segments = np.zeros(n_rows * width, np.int64)                 # 0 = padding slot
    segments[dst] = np.repeat(np.arange(1, b + 1), n)
    return Layout(b, total, n_rows * width, rows=n_rows, width=width, plan={
        "src": torch.from_numpy(src), "dst": torch.from_numpy(dst),
        "position_ids": torch.from_numpy(position_ids).view(n_rows, width),
        "segments": torch.from_numpy(segments).view(n_rows, width)})


def block_diagonal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Bool [rows, 1, width, width]: position q attends to k when both hold the same sample; the
    padding slots of a row attend to each other (never to a sample), so no query row of SDPA is
    fully masked (that would give NaN)."""
    return (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1)


def _move(values: torch.Tensor, plan: dict, n_slots: int, fill: int) -> torch.Tensor:
    out = torch.full((n_slots,), fill, dtype=values.dtype, device=values.device)
    return out.index_copy_(0, plan["dst"], values.reshape(-1).index_select(0, plan["src"]))


class Packer:
    """Turns a masked padded batch into the keyword arguments of MaskedLM.forward: padded as it is
    (packing off), or packed for the model's attention path: SDPA (a 4D mask: the model's
    attention implementation must be sdpa) or VARLEN (cumulative lengths: it must be a
    variable-length one, flash_attention_2)."""

    def __init__(self, enabled: bool, capacity: int, attention: str = SDPA):
        if attention not in (SDPA, VARLEN):
            raise ValueError(f"unknown packed attention path {attention!r}")
        self.enabled, self.capacity, self.attention = enabled, capacity, attention

    def layout(self, cpu_batch: dict[str, torch.Tensor]) -> Layout:
        """The layout of a batch still on the CPU (called before it moves to the device)."""
        lengths = sample_lengths(cpu_batch)
        b, w = cpu_batch["input_ids"].shape
        if not self.enabled:
            return Layout(b, int(lengths.sum()), b * w)
        if self.attention == SDPA:
            return plan(lengths, w, self.capacity)
        # The varlen kernel needs no rows: one row holds every sample, so nothing is padding, and
        # the samples' cumulative lengths tell the kernel where each one starts.
        out = plan(lengths, w, max(int(lengths.sum()), 1), narrow=False)
        out.plan["cu_seqlens"] = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        out.max_seqlen = int(lengths.max()) if b else 0
        return out

    def model_inputs(self, layout: Layout, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        if layout.plan is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        dev = input_ids.device
        p = {k: v.to(dev, non_blocking=True) for k, v in layout.plan.items()
             if k != ("cu_seqlens" if self.attention == SDPA else "segments")}
        shape = (layout.rows, layout.width)
        ids = _move(input_ids, p, layout.slots, PAD_ID).view(shape)
        lab = _move(labels, p, layout.slots, IGNORE_INDEX).view(shape)
        if self.attention == SDPA:
            return {"input_ids": ids, "labels": lab, "position_ids": p["position_ids"],
                    "attention_mask": block_diagonal_mask(p["segments"])}
        cu = p["cu_seqlens"]
        return {"input_ids": ids, "labels": lab, "position_ids": p["position_ids"],
                "attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": layout.max_seqlen, "max_length_k": layout.max_seqlen}


def flash_available(device: torch.device, precision: str) -> bool:
    """flash-attention 2 is installed, the device is CUDA and the weights are 16-bit (its kernels
    take fp16/bf16 only)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return False
    from transformers.utils import is_flash_attn_2_available
    return is_flash_attn_2_available()


def choose_attention(model, enabled: bool, capacity: int, device: torch.device,
                     precision: str) -> Packer:
    """The Packer for this run, with the model's attention implementation set to match; logs the
    choice once. Packing off leaves the model as it is."""
    if not enabled:
        log.info("packing: off (one sample per row, padded to the longest of its micro-batch)")
        return Packer(False, capacity)
    if flash_available(device, precision):
        model.set_attn_implementation("flash_attention_2")
        log.info("packing: on; attention: flash_attention_2 variable-length kernel (%s, %s)",
                 device, precision)
        return Packer(True, capacity, VARLEN)
    model.set_attn_implementation("sdpa")
    log.info("packing: on, rows of %d; attention: SDPA with a block-diagonal mask (%s, %s%s)",
             capacity, device, precision, "" if device.type == "cpu" else
             "; flash-attention 2 not usable here")
    return Packer(True, capacity, SDPA)
