"""Masking strategies (random, GeneMask, GLOBAL) and BERT corruption, vectorized over the batch.

Layout of a batch row: [CLS] t_1 .. t_L [SEP] [PAD]...; positions 1..L are the real tokens.
Only real tokens are ever selected: every span is clipped to them.

Spans around a token position t, for k-mer tokens (token t is the k-mer starting at nucleotide t):
- k-span: t-(k-1)//2 .. t+k//2, k tokens (t-2..t+3 for k=6, as DNABERT and GeneMask mask).
- PMI span: t-(k-1) .. t+(k-1), 2k-1 tokens: every token overlapping the k-mer T[t], so none of
  its nucleotides can be read off a neighbouring unmasked token (11 tokens for k=6).

Everything runs as whole-tensor operations (span dilation by window doubling, gathers over the
centres' windows, topk, scatter) on the tensors' device: no Python loop over samples or positions.
Random numbers are drawn on the generator's device and moved to the data: a CPU generator gives
identical selections for CPU and CUDA tensors. Centres are drawn as geometric gaps (about p * B * N
numbers, not B * N); other draws are 20-bit fields, three from each 60-bit integer.

Ranking by NPMI uses one int64 key per position: the order-preserving bits of the float32 NPMI in
the high part, random bits below them (ties are broken at random by the generator) and the position
index in the lowest bits (keys are unique, so topk is deterministic on every device, and a key
tells its own position). Non-finite NPMI (NaN, -inf: unscored k-mers) ranks lowest among real
tokens; non-real positions get key -1 and are never chosen.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmgems.errors import InputError
from cmgems.masking.names import (DEFAULT_PROBABILITY, GLOBAL_M_BINOMIAL, MASKINGS, PMI_MASKINGS,
                                  check_anchor_order, check_global_m, check_masking,
                                  check_pmi_lookup)
from cmgems.data.npmi_table import npmi_of_ids
from cmgems.data.tokens import K_RANGE, MASK_ID, NUM_SPECIAL, SEP_ID, UNK_ID

# GeneMask halves the kept anchors only once a sample has this many centres.
GENEMASK_HALVING_MIN = 9
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # BERT corruption; the rest stays unchanged
IGNORE_INDEX = -100


def kspan(k: int) -> tuple[int, int]:
    """(left, right) extent of the k-span around a centre: t-left .. t+right, k tokens."""
    return (k - 1) // 2, k // 2


def pmi_span(k: int) -> tuple[int, int]:
    """(left, right) extent of the PMI span: every token overlapping the k-mer at t."""
    return k - 1, k - 1


def real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool [B, N]: positions holding sequence tokens (not [CLS]/[SEP]/[PAD], inside the mask)."""
    # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3: everything above [SEP] is a k-mer (or a [MASK] standing
    # for one), and [UNK] stands for a k-mer holding a non-ACGT base.
    real = (input_ids > SEP_ID) | (input_ids == UNK_ID)
    if attention_mask is not None:
        real &= attention_mask.bool()
    return real


def _sliding(x: torch.Tensor, left: int, right: int, combine, fill) -> torch.Tensor:
    """out[p] = combine over x[p-right .. p+left] (fill beyond the row), by window doubling."""
    n = x.shape[1]
    width = left + right + 1
    cur = F.pad(x, (right, left), value=fill)  # cur[:, p .. p+width-1] is p's window
    covered = 1
    while covered * 2 <= width:  # log2(width) steps, each a whole-tensor op
        cur = combine(cur[:, :-covered], cur[:, covered:])
        covered *= 2
    if covered < width:
        rest = width - covered
        cur = combine(cur[:, :-rest], cur[:, rest:])
    return cur[:, :n]


def dilate(centres: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Bool [B, N]: positions covered by a span t-left..t+right around some centre t."""
    # p is covered when a centre lies in p-right .. p+left.
    return _sliding(centres.bool(), left, right, torch.logical_or, False)


def _new_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    gen = torch.Generator()  # a private, OS-entropy seeded stream; the global RNG stays untouched
    gen.seed()
    return gen


# Random numbers come as 20-bit fields, three cut from each 60-bit draw: the CPU generator costs
# about the same per number whatever the width, so this draws a third as many numbers as
# torch.rand would. Probabilities compared against a field are resolved to 2**-20.
FIELD_BITS = 20
_FIELD_MASK = (1 << FIELD_BITS) - 1
_FIELD_ONE = 1 << FIELD_BITS


def _fields(count: int, generator: torch.Generator, device) -> torch.Tensor:
    """`count` independent uniform integers in [0, 2**20), int64, on `device`."""
    draws = torch.randint(0, 1 << (3 * FIELD_BITS), ((count + 2) // 3,), generator=generator,
                          device=generator.device, dtype=torch.int64)
    shifts = torch.arange(0, 3 * FIELD_BITS, FIELD_BITS, device=draws.device).unsqueeze(1)
    parts = (draws.unsqueeze(0) >> shifts) & _FIELD_MASK  # [3, draws]
    return parts.reshape(-1)[:count].to(device)


def _threshold(p: float) -> int:
    """Field value below which an event of probability p happens."""
    return round(p * _FIELD_ONE)


def _position_bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def rank_keys(npmi: torch.Tensor, real: torch.Tensor, noise: torch.Tensor,
              positions: torch.Tensor | None = None, row_length: int | None = None
              ) -> torch.Tensor:
    """Unique int64 key per position ordering by NPMI, ties by `noise`; -1 where not real.

    npmi, real, noise (random 20-bit fields): [B, N] rows, or any matching shapes together with
    the row `positions` they hold and the `row_length` N.
    """
    n = npmi.shape[-1] if row_length is None else row_length
    if positions is None:
        positions = torch.arange(n, device=npmi.device, dtype=torch.int64)
    pbits = _position_bits(n)
    nbits = min(FIELD_BITS, 31 - pbits)
    if nbits < 0:
        raise ValueError(f"rows of {n} positions are too long to rank (at most 2**31)")
    inf = float("inf")
    # NaN -> -inf (unscored ranks lowest); + 0.0 turns -0.0 into +0.0 so the two zeros tie.
    s = torch.nan_to_num(npmi.to(torch.float32), nan=-inf, posinf=inf, neginf=-inf) + 0.0
    bits = s.view(torch.int32)
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of negatives
    # makes them order like two's complement ones; the offset makes every key non-negative.
    order = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    if nbits < FIELD_BITS:
        noise = noise & ((1 << nbits) - 1)
    low = (noise << pbits) | positions
    keys = ((order << 31) | low) + (1 << 62)
    return torch.where(real, keys, -1)


def _mark_top(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: the positions of the counts[b] highest non-negative keys of each row."""
    b, n = keys.shape
    out = torch.zeros(b, n + 1, dtype=torch.bool, device=keys.device)
    top_n = int(counts.max()) if b else 0
    if top_n <= 0:
        return out[:, :n]
    top = keys.topk(min(top_n, n), dim=1).values
    rank = torch.arange(top.shape[1], device=keys.device)
    keep = (rank < counts.unsqueeze(1)) & (top >= 0)
    pos = torch.where(keep, top & ((1 << _position_bits(n)) - 1), n)  # dropped -> spare column n
    out.scatter_(1, pos, True)
    return out[:, :n]


def bernoulli_positions(count: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """Ascending indices in [0, count) of independent Bernoulli(p) successes (int64, on device).

    Drawn as geometric gaps between successes (inverse CDF in float64): about count * p draws
    instead of count, which matters at GeneMask's and DNABERT's 2 % centre rates.
    """
    if count <= 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if p >= 1.0:
        return torch.arange(count, device=device)
    log_q = math.log1p(-p)
    expected = count * p
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # one draw suffices almost always
    parts, last = [], -1.0
    while last < count:
        u = torch.rand(chunk, generator=generator, device=generator.device, dtype=torch.float64)
        gaps = torch.floor(torch.log1p(-u) / log_q) + 1  # P(gap = g) = (1-p)^(g-1) p, g >= 1
        at = last + gaps.cumsum(0)
        parts.append(at)
        last = float(at[-1])
    at = torch.cat(parts) if len(parts) > 1 else parts[0]
    return at[at < count].to(torch.int64).to(device)


def _centres(real: torch.Tensor, p: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Bernoulli(p) centres over the real tokens: (flat row-major indices, bool [B, N])."""
    flat = bernoulli_positions(real.numel(), p, gen, real.device)
    flat = flat[real.reshape(-1)[flat]]
    centres = torch.zeros(real.numel(), dtype=torch.bool, device=real.device)
    centres[flat] = True
    return flat, centres.view(real.shape)


def _select_random(real, npmi, p, k, gen, global_m, anchor_order):
    _, centres = _centres(real, p, gen)
    return dilate(centres, *kspan(k)) & real


def genemask_from_centres(centres: torch.Tensor, real: torch.Tensor, npmi: torch.Tensor,
                          generator: torch.Generator, k: int = 6,
                          anchor_order: str = "top") -> torch.Tensor:
    """GeneMask's selection for given centres (bool [B, N], real tokens only).

    Each centre's k-span; plus the PMI span of the best-NPMI position of each centre's k-span,
    for ceil(n/2) of those anchors when a row has n >= 9 centres, else all: the top ones by NPMI
    (anchor_order "top", GeneMask's rule), or those of the first ceil(n/2) centres in position
    order ("first", as the published CM-GEMS script's GeneMask stage keeps them).
    """
    return _genemask(centres.reshape(-1).nonzero().squeeze(1), centres, real, npmi, generator, k,
                     anchor_order)


def _genemask(flat, centres, real, npmi, gen, k, anchor_order="top"):
    """genemask_from_centres given also the centres' flat indices (ascending).

    Only the centres' windows (about p * k of the positions) are ranked, as one flat list; the
    tie-break noise is drawn per window entry.
    """
    b, n = centres.shape
    left, right = kspan(k)
    rows, centre_cols = flat // n, flat % n
    cols = centre_cols.unsqueeze(1) + torch.arange(-left, right + 1, device=centres.device)
    inside = (cols >= 0) & (cols < n)
    cols = cols.clamp(0, n - 1)
    at = (flat - centre_cols).unsqueeze(1) + cols  # [centres, k] flat indices of each window
    noise = _fields(at.numel(), gen, centres.device).view(at.shape)
    keys = rank_keys(npmi.reshape(-1)[at], real.reshape(-1)[at] & inside, noise, cols, n)
    anchors = keys.amax(1)  # the centre itself is real, so every window has a real best
    if check_anchor_order(anchor_order) == "first":
        order = torch.arange(anchors.numel(), device=centres.device)  # flat: rows, then columns
    else:
        # Rank the anchors within their row: by key descending, then (stably) by row.
        order = torch.argsort(anchors, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
    counts = torch.bincount(rows, minlength=b)
    keep = torch.where(counts >= GENEMASK_HALVING_MIN, (counts + 1) // 2, counts)
    row_of = rows[order]
    rank = torch.arange(order.numel(), device=centres.device) - (counts.cumsum(0) - counts)[row_of]
    kept_at = row_of * n + (anchors[order] & ((1 << _position_bits(n)) - 1))
    kept = torch.zeros(b * n, dtype=torch.bool, device=centres.device)
    kept[kept_at[rank < keep[row_of]]] = True
    return (dilate(centres, left, right) | dilate(kept.view(b, n), *pmi_span(k))) & real


def _select_genemask(real, npmi, p, k, gen, global_m, anchor_order):
    flat, centres = _centres(real, p, gen)
    return _genemask(flat, centres, real, npmi, gen, k, anchor_order)


def global_anchors(length: torch.Tensor, p: float, global_m: int | str = 0,
                   real: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """GLOBAL's m per sample of `length` real tokens: max(1, round(L x p)) (global_m = 0),
    global_m in every sample, or ("binomial", as the published code counts them) the number of
    Bernoulli(p) centres drawn over the sample's real tokens (bool [B, N] `real`, from
    `generator`), which may be 0; never more than L."""
    if global_m == GLOBAL_M_BINOMIAL:
        if real is None or generator is None:
            raise ValueError("global_m 'binomial' needs the real tokens and a generator")
        _, centres = _centres(real, p, generator)
        return centres.sum(1)
    if global_m:
        m = torch.full_like(length, global_m)
    else:
        m = torch.clamp(torch.round(length.to(torch.float64) * p), min=1).to(torch.int64)
    return torch.minimum(m, length)


def _select_global(real, npmi, p, k, gen, global_m, anchor_order):
    m = global_anchors(real.sum(1), p, global_m, real, gen)
    noise = _fields(real.numel(), gen, real.device).view(real.shape)
    kept = _mark_top(rank_keys(npmi, real, noise), m)
    return dilate(kept, *pmi_span(k)) & real


_SELECTORS = dict(zip(MASKINGS, (_select_random, _select_genemask, _select_global)))  # names' order


def _check_params(k: int, p: float, global_m) -> None:
    check_global_m(global_m)
    if k not in K_RANGE:
        raise InputError(f"masking k: must be in {K_RANGE.start}..{K_RANGE.stop - 1}, got {k}")
    if not 0.0 <= p <= 1.0:
        raise InputError(f"masking mlm_probability: must be in [0, 1], got {p}")


def _check_shapes(input_ids, npmi, attention_mask):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if npmi.shape != input_ids.shape:
        raise ValueError(f"npmi shape {tuple(npmi.shape)} != input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                         f"{tuple(input_ids.shape)}")


def position_npmi(npmi_table: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """Float32 [n]: the NPMI of the k-mer whose token id equals each position index, NaN where
    that id is a special token or beyond the vocabulary ("position" lookup)."""
    table = torch.as_tensor(npmi_table, dtype=torch.float32, device=device)
    return npmi_of_ids(table, torch.arange(n, device=table.device))


def lookup_npmi(npmi: torch.Tensor, pmi_lookup: str = "token",
                npmi_table: torch.Tensor | None = None) -> torch.Tensor:
    """The NPMI a PMI masking ranks by: `npmi` itself (token lookup), or for position lookup the
    table's value at every position's index, the same row for every sample (needs the table:
    NPMI per k-mer code, as cmgems.data.npmi_table.load_table gives)."""
    if check_pmi_lookup(pmi_lookup) == "token":
        return npmi
    if npmi_table is None:
        raise ValueError("pmi_lookup 'position' needs the NPMI table (npmi_table=...)")
    return position_npmi(npmi_table, npmi.shape[-1], npmi.device).expand(npmi.shape)


def select(strategy: str, input_ids: torch.Tensor, npmi: torch.Tensor,
           attention_mask: torch.Tensor | None, generator: torch.Generator | None = None, *,
           k: int = 6, mlm_probability: float | None = None, global_m: int | str = 0,
           pmi_lookup: str = "token", npmi_table: torch.Tensor | None = None,
           genemask_anchor_order: str = "top") -> torch.Tensor:
    """Bool [B, N]: the positions `strategy` chooses for prediction (before corruption).

    global_m (GLOBAL only): anchors per sample; 0 = max(1, round(L x mlm_probability)); N > 0 =
    N; "binomial" = the number of Bernoulli(mlm_probability) draws over the sample (may be 0).
    genemask_anchor_order (GeneMask only): "top" or "first", see genemask_from_centres.
    pmi_lookup (genemask, global): "token" ranks each position by its own k-mer's NPMI;
    "position" by the NPMI of the k-mer whose id is the position index (see lookup_npmi), which
    needs npmi_table (float [4^k] by k-mer code)."""
    check_masking(strategy)
    check_pmi_lookup(pmi_lookup)
    check_anchor_order(genemask_anchor_order)
    p = DEFAULT_PROBABILITY[strategy] if mlm_probability is None else float(mlm_probability)
    _check_params(k, p, global_m)
    _check_shapes(input_ids, npmi, attention_mask)
    if strategy in PMI_MASKINGS:
        npmi = lookup_npmi(npmi, pmi_lookup, npmi_table)
    real = real_tokens(input_ids, attention_mask)
    return _SELECTORS[strategy](real, npmi, p, k, _new_generator(generator), global_m,
                                genemask_anchor_order)


def corrupt(input_ids: torch.Tensor, selected: torch.Tensor, vocab_size: int,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT corruption: selected -> 80 % [MASK], 10 % random k-mer, 10 % unchanged.

    Returns (inputs, labels); labels hold the original id where selected and -100 elsewhere.
    Random replacements are k-mers only (ids >= NUM_SPECIAL), never a special token.
    """
    if vocab_size <= NUM_SPECIAL:
        raise ValueError(f"vocab_size {vocab_size} holds no k-mer tokens")
    if vocab_size - NUM_SPECIAL > _FIELD_ONE:
        raise ValueError(f"vocab_size {vocab_size} exceeds 2**{FIELD_BITS} k-mers")
    gen = _new_generator(generator)
    selected = selected.bool()
    # Draw only for the selected positions (about 15 %), two fields each, in row-major order.
    n_sel = int(selected.sum())
    draws = _fields(2 * n_sel, gen, input_ids.device).view(2, n_sel)
    original = torch.masked_select(input_ids, selected)
    # Multiply-shift maps a field onto the k-mer ids; exact for 4**k k-mers (a power of two).
    replacement = NUM_SPECIAL + ((draws[1] * (vocab_size - NUM_SPECIAL)) >> FIELD_BITS)
    values = torch.where(draws[0] < _threshold(MASK_FRACTION),
                         torch.full_like(original, MASK_ID), original)
    to_random = (draws[0] >= _threshold(MASK_FRACTION)) & (
        draws[0] < _threshold(MASK_FRACTION + RANDOM_FRACTION))
    values = torch.where(to_random, replacement.to(original.dtype), values)
    inputs = input_ids.masked_scatter(selected, values)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return inputs, labels


def _strategy_rows(strategies: str | Sequence[str], batch: int) -> dict[str, np.ndarray | None]:
    """{strategy: row indices} (None = the whole batch), in a fixed order for reproducible draws."""
    if isinstance(strategies, str):
        return {check_masking(strategies): None}
    if len(strategies) != batch:
        raise ValueError(f"{len(strategies)} strategies for a batch of {batch}")
    names = np.asarray(strategies, dtype=object)
    present = set(names.tolist())
    for name in present:
        check_masking(name)
    if len(present) == 1:
        return {present.pop(): None}
    return {s: np.flatnonzero(names == s) for s in MASKINGS if s in present}


def mask_batch(input_ids: torch.Tensor, npmi: torch.Tensor, attention_mask: torch.Tensor | None,
               strategies: str | Sequence[str], vocab_size: int,
               generator: torch.Generator | None, k: int = 6,
               probabilities: dict[str, float] | None = None, global_m: int | str = 0,
               pmi_lookup: str = "token", npmi_table: torch.Tensor | None = None,
               genemask_anchor_order: str = "top",
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select the positions to predict, then corrupt them as BERT does (80 % [MASK], 10 % a
    random k-mer, 10 % unchanged).

    Args:
        input_ids: long [B, N], [CLS] k-mer ids [SEP] then padding.
        npmi: float [B, N], the NPMI of each position's k-mer (NaN: unscored, or special).
        attention_mask: [B, N], 1 on real tokens ([CLS] and [SEP] included); None: no padding.
        strategies: one masking for the whole batch, or one per sample (cmgems.masking.names).
        vocab_size: of the model; the random 10 % are drawn from the k-mer ids below it.
        generator: every random draw comes from it (None: a fresh unseeded one).
        k: the k-mer length; a masked centre hides the k-span of k-mers that overlap it.
        probabilities: {masking: centre (random, genemask) or anchor (global) probability},
            over DEFAULT_PROBABILITY.
        global_m: GLOBAL's anchors per sample (0 = round(L x its probability)), see `select`.
        pmi_lookup, npmi_table: where genemask and global read NPMI, see `select`.
        genemask_anchor_order: which anchors GeneMask keeps, see `select`.
    Returns:
        (inputs, labels, selected): the corrupted ids; the original ids at selected positions
        and IGNORE_INDEX elsewhere; bool [B, N] of the selected positions.

    Example, k = 6 and random masking: a centre drawn at position 40 selects positions 38..43
    (kspan(6) == (2, 3)): six consecutive k-mers, DNABERT's rule, so that a hidden k-mer is not
    spelled out by its unmasked overlapping neighbours."""
    probs = dict(DEFAULT_PROBABILITY)
    for name, p in (probabilities or {}).items():
        probs[check_masking(name)] = float(p)
    gen = _new_generator(generator)
    groups = _strategy_rows(strategies, input_ids.shape[0])
    if len(groups) == 1:
        (name,) = groups
        selected = select(name, input_ids, npmi, attention_mask, gen, k=k,
                          mlm_probability=probs[name], global_m=global_m,
                          pmi_lookup=pmi_lookup, npmi_table=npmi_table,
                          genemask_anchor_order=genemask_anchor_order)
    else:
        selected = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for name, rows in groups.items():  # at most three groups
            idx = torch.as_tensor(rows, device=input_ids.device)
            mask = None if attention_mask is None else attention_mask[idx]
            selected[idx] = select(name, input_ids[idx], npmi[idx], mask, gen, k=k,
                                   mlm_probability=probs[name], global_m=global_m,
                                   pmi_lookup=pmi_lookup, npmi_table=npmi_table,
                                   genemask_anchor_order=genemask_anchor_order)
    inputs, labels = corrupt(input_ids, selected, vocab_size, gen)
    return inputs, labels, selected


def mask_stats(selected: torch.Tensor, npmi: torch.Tensor, attention_mask: torch.Tensor,
               strategies: str | Sequence[str]) -> dict[str, float]:
    """Figures for logging one masked batch.

    selected_fraction: selected / real tokens; spans_per_sample: contiguous selected runs per
    sample; npmi_selected / npmi_real: mean finite NPMI of selected and of all real tokens (NaN
    when there is none); mix_<strategy>: fraction of samples masked with each strategy. Real tokens
    are positions 1..L, L = attention_mask row sum - 2 ([CLS] and [SEP]).
    """
    b, n = selected.shape
    length = attention_mask.to(torch.int64).sum(1) - 2
    pos = torch.arange(n, device=selected.device)
    real = (pos >= 1) & (pos <= length.unsqueeze(1))
    sel = selected.bool() & real
    starts = sel.clone()
    starts[:, 1:] &= ~sel[:, :-1]
    values = npmi.to(torch.float32)
    finite = torch.isfinite(values)
    zero = torch.zeros((), dtype=torch.float32, device=values.device)

    def mean_over(where: torch.Tensor) -> float:
        count = int(where.sum())
        return float(torch.where(where, values, zero).sum()) / count if count else float("nan")

    n_real = int(real.sum())
    stats = {
        "selected_fraction": int(sel.sum()) / n_real if n_real else 0.0,
        "spans_per_sample": int(starts.sum()) / b if b else 0.0,
        "npmi_selected": mean_over(sel & finite),
        "npmi_real": mean_over(real & finite),
    }
    if isinstance(strategies, str):
        strategies = [check_masking(strategies)] * b
    names = np.asarray(list(strategies), dtype=object)
    for name in MASKINGS:
        stats[f"mix_{name}"] = float(np.mean(names == name)) if len(names) else 0.0
    return stats
