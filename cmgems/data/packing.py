"""Sequence packing: the samples of a micro-batch laid back to back ([CLS] s1 [SEP] [CLS] s2 [SEP]
...) into one row of real tokens, so the model computes on real tokens instead of [PAD].

Masking never sees the packed layout: it runs per sample on the padded batch, as without packing
(spans stay inside their sample, GLOBAL's m counts the sample's own tokens, [CLS]/[SEP] are never
chosen), and only its result (inputs and labels) is moved into the packed row. The samples, the
predicted positions and their labels are therefore exactly those of the unpacked step.

The plan (where each sample's tokens go) is computed on the CPU from the samples' lengths, before
the batch goes to the device: no device value is read back to pack. On the device packing is one
gather with the plan's index tensor.

Every layer but attention (the embeddings, the projections, the feed-forward blocks, about 90 % of
a BERT's FLOPs) runs on that one row: no padding at all. Attention never crosses samples, and
position ids restart at 0 in every sample (token type ids stay 0). It runs either through a
variable-length kernel (flash-attn's, or torch's own torch.nn.attention.varlen.varlen_attn where
flash-attn is not installed), given the samples' cumulative lengths; or through SDPA over rows:
the samples first-fit into rows of at most max_length, attended with a block-diagonal
[rows, 1, width, width] boolean mask, the row layout made and undone inside the attention function
(ROWS_IMPL), so only attention computes the rows' padding. attention_path decides which from what
the machine has, choose_attention applies it at start-up (docs/pretraining.md, "Packing").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmgems.errors import InputError
from cmgems.precision import torch_dtype

log = logging.getLogger("cmgems")

SDPA, VARLEN = "sdpa", "varlen"  # the two packed attention paths (the inputs they take)
# The model's attention implementations behind them: ours for SDPA over rows and for torch's
# variable-length kernel (registered with transformers.AttentionInterface on first use), and
# transformers' own name for flash-attn's.
ROWS_IMPL, FLASH_IMPL, TORCH_VARLEN_IMPL = ("cmgems_sdpa_rows", "flash_attention_2",
                                            "cmgems_torch_varlen")
# What the packed_attention option may ask for: auto (attention_path decides), or one path.
PACKED_ATTENTION = ("auto", "sdpa", "torch_varlen", "flash_attn")


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
    slots: int                   # positions the model's dense layers compute
    plan: dict[str, torch.Tensor] | None = None
    rows: int = 0                # the rows SDPA attends over (packed)
    width: int = 0
    max_seqlen: int = 0          # the longest sample, with plan["cu_seqlens"] (varlen path)

    @property
    def real_token_share(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0

    @property
    def attention_slots(self) -> int:
        """Positions SDPA attends over: the rows (packed), the padded batch (packing off)."""
        return self.rows * self.width if self.plan is not None else self.slots


def plan(lengths: torch.Tensor, padded_width: int, capacity: int,
         narrow: bool = True) -> Layout:
    """The packed layout of samples with these lengths (int64 [B], CPU) in a padded batch of
    `padded_width` columns: every sample's tokens in one row, in data order (`src`: where each
    comes from in the padded batch; `positions`: its place inside its sample), and for SDPA the
    rows it is attended in: first-fit into rows of `capacity` positions, or (`narrow`) into rows
    as wide as the longest sample where that attends over no more positions (short samples only:
    three of 30 in rows of 64 would be two rows of 60, more than three rows of 30), so attention
    never covers more positions than in the padded batch, and at equal positions takes the
    narrower rows (its cost grows with the square of the width). The row width is the fullest
    row's fill; `dst` is each token's slot in the rows, `segments` the rows' sample numbers.

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
    segments = np.zeros(n_rows * width, np.int64)                 # 0 = padding slot
    segments[dst] = np.repeat(np.arange(1, b + 1), n)
    return Layout(b, total, total, rows=n_rows, width=width, plan={
        "src": torch.from_numpy(src), "positions": torch.from_numpy(within),
        "dst": torch.from_numpy(dst), "segments": torch.from_numpy(segments).view(n_rows, width)})


def block_diagonal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Bool [rows, 1, width, width]: position q attends to k when both hold the same sample; the
    padding slots of a row attend to each other (never to a sample), so no query row of SDPA is
    fully masked (that would give NaN)."""
    return (segments.unsqueeze(2) == segments.unsqueeze(1)).unsqueeze(1)


class Packer:
    """Turns a masked padded batch into the keyword arguments of MaskedLM.forward: padded as it is
    (packing off), or packed for the model's attention path: SDPA (the rows' token slots and
    block-diagonal mask: its attention implementation must be ROWS_IMPL) or VARLEN (cumulative
    lengths: a variable-length one, flash_attention_2 or cmgems_torch_varlen)."""

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
        out = plan(lengths, w, self.capacity)
        if self.attention == VARLEN:
            # The kernel attends within each sample from where it starts: no rows at all.
            out.plan = {"src": out.plan["src"], "positions": out.plan["positions"],
                        "cu_seqlens": F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)}
            out.rows, out.width = 1, out.real_tokens
            out.max_seqlen = int(lengths.max()) if b else 0
        return out

    def model_inputs(self, layout: Layout, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, labels: torch.Tensor) -> dict:
        if layout.plan is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        dev = input_ids.device
        p = {k: v.to(dev, non_blocking=True) for k, v in layout.plan.items()}
        out = {"input_ids": input_ids.reshape(-1).index_select(0, p["src"]).unsqueeze(0),
               "labels": labels.reshape(-1).index_select(0, p["src"]).unsqueeze(0),
               "position_ids": p["positions"].unsqueeze(0), "attention_mask": None}
        if self.attention == SDPA:
            return out | {"packed_slots": p["dst"],
                          "packed_mask": block_diagonal_mask(p["segments"])}
        cu = p["cu_seqlens"]
        return out | {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                      "max_length_q": layout.max_seqlen, "max_length_k": layout.max_seqlen}


def rows_kernel(device_type: str, dtype: torch.dtype, dropout: float) -> str:
    """The kernel SDPA over rows attends with: "eager" (transformers' eager attention: the
    scores, softmax and dropout as plain tensor operations, in the model's dtype) for 16-bit
    training with attention dropout on a CPU, where SDPA has no fused kernel with dropout and its
    fallback runs at half eager's speed (docs/performance.md); "sdpa" everywhere else."""
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and dropout > 0:
        return "eager"
    return "sdpa"


def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   packed_slots=None, packed_mask=None, **_):
    """A transformers attention function (AttentionInterface, ROWS_IMPL): SDPA over the Packer's
    rows, for a model whose other layers run on the one packed row. query, key and value
    [1, heads, T, d] go to their tokens' slots in the rows (`packed_slots`, [T]), attention runs
    under the block-diagonal mask `packed_mask` [rows, 1, width, width] with the model's
    attention dropout (through rows_kernel's kernel), and the tokens' outputs come back in row
    order: [1, T, heads, d]."""
    if packed_slots is None or query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("SDPA over rows takes one packed row, its tokens' slots in the rows and "
                         "the rows' block-diagonal mask (cmgems.data.packing.Packer, SDPA)")
    rows, width = packed_mask.shape[0], packed_mask.shape[-1]

    def to_rows(t):  # [1, heads, T, d] -> [rows, heads, width, d]; padding slots are zero
        t = t[0].transpose(0, 1)
        slots = t.new_zeros((rows * width, *t.shape[1:])).index_copy_(0, packed_slots, t)
        return slots.view(rows, width, *t.shape[1:]).transpose(1, 2)

    q, k, v = map(to_rows, (query, key, value))
    if rows_kernel(query.device.type, query.dtype, dropout) == "eager":
        from transformers.models.bert.modeling_bert import eager_attention_forward
        additive = torch.zeros(packed_mask.shape, dtype=q.dtype, device=q.device)
        additive.masked_fill_(~packed_mask, torch.finfo(q.dtype).min)
        out = eager_attention_forward(module, q, k, v, additive, scaling=scaling,
                                      dropout=dropout)[0]         # [rows, width, heads, d]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask, dropout_p=dropout,
                                             scale=scaling).transpose(1, 2)
    out = out.reshape(rows * width, *out.shape[2:])
    return out.index_select(0, packed_slots).unsqueeze(0), None


def flash_available(device: torch.device, precision: str) -> bool:
    """flash-attention 2 is installed, the device is CUDA and the weights are 16-bit (its kernels
    take fp16/bf16 only)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return False
    return flash_installed()


def flash_installed() -> bool:
    """The flash-attn package is installed and transformers can use it."""
    from transformers.utils import is_flash_attn_2_available
    return is_flash_attn_2_available()


def torch_varlen_available(device: torch.device) -> bool:
    """torch's own variable-length attention can run on `device`: torch ships
    torch.nn.attention.varlen (2.10+), and it is a CUDA device on which torch's flash kernel, the
    one varlen_attn calls, runs (built with it, compute capability 8.0 or newer). It has no CPU
    implementation."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    from importlib.util import find_spec
    if find_spec("torch.nn.attention.varlen") is None:
        return False
    return (torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@dataclass(frozen=True)
class AttentionChoice:
    """How a packed batch is attended: the layout (SDPA rows with a mask, or VARLEN: one row and
    cumulative lengths), the model's attention implementation, and why, in words."""
    path: str
    implementation: str
    reason: str


def attention_path(device_type: str, flash: bool, torch_varlen: bool, precision: str,
                   attention_dropout: float = 0.0, head_dim: int = 64,
                   want: str = "auto") -> AttentionChoice:
    """The packed attention path for a machine, as a pure function of what it has: the device
    type, whether flash-attn is installed, whether torch's varlen_attn can run there, the training
    precision, the model's attention-probability dropout and its head size.

    The variable-length kernels are CUDA's and take 16-bit inputs with heads of at most 256 (a
    multiple of 8). flash-attn's is preferred: it applies attention dropout as the padded step
    does. torch's own applies none (its dropout is fixed at 0), so it is taken only for a model
    trained without attention dropout; a model with some keeps SDPA, which drops out as the padded
    step does, rather than silently training without it. Everywhere else SDPA attends over rows
    with the block-diagonal mask (on the CPU, any precision).

    `want` (a PACKED_ATTENTION key) names one path instead of auto: taken where it can run (torch's
    kernel then even with attention dropout, said in the reason), else InputError saying why."""
    if want != "auto":
        return _asked_path(device_type, flash, torch_varlen, precision, attention_dropout,
                           head_dim, want)

    def sdpa(why: str) -> AttentionChoice:
        return AttentionChoice(SDPA, ROWS_IMPL, f"SDPA over rows with a block-diagonal mask: "
                                                f"{why}")

    if device_type != "cuda":
        return sdpa(f"the variable-length kernels are CUDA-only ({device_type})")
    if precision not in ("bf16", "fp16"):
        return sdpa(f"the variable-length kernels take fp16/bf16, the run is {precision}")
    if head_dim > 256 or head_dim % 8:
        return sdpa(f"the variable-length kernels take heads of <= 256 (a multiple of 8), the "
                    f"model's are {head_dim}")
    if flash:
        return AttentionChoice(VARLEN, FLASH_IMPL, "flash-attn's variable-length kernel "
                               "(flash_attention_2; flash-attn is installed)")
    if not torch_varlen:
        return sdpa("flash-attn is not installed and torch's varlen_attn cannot run here (it "
                    "needs torch's flash kernel on a GPU of compute capability 8.0+)")
    if attention_dropout > 0:
        return sdpa(f"flash-attn is not installed, and torch's varlen_attn applies no attention "
                    f"dropout while the model trains with {attention_dropout}; install flash-attn "
                    f"for the variable-length path")
    return AttentionChoice(VARLEN, TORCH_VARLEN_IMPL, "torch's own variable-length kernel "
                           "(torch.nn.attention.varlen.varlen_attn; flash-attn is not installed)")


def _asked_path(device_type: str, flash: bool, torch_varlen: bool, precision: str,
                attention_dropout: float, head_dim: int, want: str) -> AttentionChoice:
    if want not in PACKED_ATTENTION:
        raise InputError(f"packed_attention must be one of {PACKED_ATTENTION}, got {want!r}")
    if want == "sdpa":
        return AttentionChoice(SDPA, ROWS_IMPL, "SDPA over rows with a block-diagonal mask "
                                                "(asked for)")
    auto = attention_path("cuda", want == "flash_attn", want == "torch_varlen", precision, 0.0,
                          head_dim)
    why = ("it is CUDA-only" if device_type != "cuda" else
           "flash-attn is not installed" if want == "flash_attn" and not flash else
           "torch's varlen_attn cannot run here (flash kernel, compute capability 8.0+)"
           if want == "torch_varlen" and not torch_varlen else
           auto.reason.split(": ", 1)[-1] if auto.path == SDPA else "")
    if why:
        raise InputError(f"packed_attention {want}: not usable here: {why}")
    if want == "torch_varlen" and attention_dropout > 0:
        return AttentionChoice(VARLEN, TORCH_VARLEN_IMPL, f"{auto.reason}, asked for: the model's "
                               f"attention dropout ({attention_dropout}) is not applied")
    return AttentionChoice(auto.path, auto.implementation, f"{auto.reason}, asked for")


def varlen_attention(kernel):
    """A transformers attention function (AttentionInterface) over `kernel`, a variable-length
    attention with varlen_attn's signature: (q, k, v [tokens, heads, head_dim], cu_seq_q, cu_seq_k,
    max_q, max_k, scale=) -> [tokens, heads, head_dim]. It takes the Packer's VARLEN inputs: one
    row holding every sample, and the cumulative lengths transformers passes through from the
    model's forward (cu_seq_lens_q/k, max_length_q/k)."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                  **_):
        if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
            raise ValueError("variable-length attention takes one packed row and the samples' "
                             "cumulative lengths (cmgems.data.packing.Packer, VARLEN), no mask")
        # `dropout` is not applied: the kernel has none (attention_path picks this function for
        # a model with attention dropout only where packed_attention asks for it, and says so).
        # [1, heads, T, d] as the model's projections lay them out: row 0 transposed back is
        # [T, heads, d] with a contiguous last dimension, as the kernel takes it (no copy).
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                     scale=scaling)
        return out.unsqueeze(0), None  # [1, T, heads, d], as transformers' attention returns
    return attention


def register_attention(implementation: str) -> None:
    """Register cmgems' attention function `implementation` (ROWS_IMPL, TORCH_VARLEN_IMPL) with
    transformers (idempotent); transformers' own names need none."""
    from transformers import AttentionInterface
    if implementation == ROWS_IMPL:
        AttentionInterface.register(ROWS_IMPL, rows_attention)
    elif implementation == TORCH_VARLEN_IMPL:
        from torch.nn.attention.varlen import varlen_attn
        AttentionInterface.register(TORCH_VARLEN_IMPL, varlen_attention(varlen_attn))


def choose_attention(model, enabled: bool, capacity: int, device: torch.device,
                     precision: str, want: str = "auto") -> Packer:
    """The Packer for this run, with the model's attention implementation set to match; logs the
    choice and its reason once. Packing off leaves the model as it is."""
    if not enabled:
        log.info("packing: off (one sample per row, padded to the longest of its micro-batch)")
        return Packer(False, capacity)
    cfg = model.config
    choice = attention_path(device.type, device.type == "cuda" and flash_installed(),
                            torch_varlen_available(device), precision,
                            cfg.attention_probs_dropout_prob,
                            cfg.hidden_size // cfg.num_attention_heads, want)
    register_attention(choice.implementation)
    model.set_attn_implementation(choice.implementation)
    rows = f", rows of {capacity}" if choice.path == SDPA else ", one row per micro-batch"
    kernel = ""
    if choice.path == SDPA and rows_kernel(device.type, torch_dtype(precision),
                                           cfg.attention_probs_dropout_prob) == "eager":
        kernel = ("; in training through transformers' eager attention (16-bit on a CPU with "
                  "attention dropout, where SDPA's dropout path is the slower)")
    log.info("packing: on%s; attention: %s (%s, %s)%s", rows, choice.reason, device, precision,
             kernel)
    return Packer(True, capacity, choice.path)
