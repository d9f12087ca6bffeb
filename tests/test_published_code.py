"""The authors' published-code readings as options, each against a loop oracle written from
reading their functions (docs/reproducing.md): the oracles loop over positions on purpose, the
product does not."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmgems.data.tokens import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from cmgems.masking import maskings

K = 6
SPAN_11 = range(-5, 6)        # the PMI span around an anchor (2k-1 tokens for k = 6)
KSPAN = (-2, -1, 1, 2, 3)     # a centre's k-span, without the centre itself


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_table(seed: int = 0) -> torch.Tensor:
    """An NPMI table scoring every 6-mer with a distinct value (no ties to break)."""
    return torch.from_numpy(np.random.default_rng(seed).permutation(4 ** K).astype(np.float32)
                            / 4 ** K - 0.5)


def rows(lengths: list[int], seed: int, table: torch.Tensor):
    """[CLS] random k-mer ids [SEP] [PAD]... rows, with the NPMI of each token's own k-mer."""
    rng = np.random.default_rng(seed)
    width = max(lengths) + 2
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.int64)
    attn = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, 0] = CLS_ID
        ids[r, 1:n + 1] = torch.from_numpy(rng.integers(NUM_SPECIAL, NUM_SPECIAL + 4 ** K, n))
        ids[r, n + 1] = SEP_ID
        attn[r, :n + 2] = 1
    code = (ids - NUM_SPECIAL).clamp(0, 4 ** K - 1)
    npmi = torch.where(ids >= NUM_SPECIAL, table[code], torch.tensor(float("nan")))
    return ids, npmi, attn


def rank_by_id(table: torch.Tensor):
    """The authors' kmer_id_to_pmi_rank: rank 1 = highest NPMI; a special or unknown id ranks
    last (their 4096)."""
    order = torch.argsort(table, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(table) + 1)

    def of(token_id: int) -> int:
        code = token_id - NUM_SPECIAL
        return int(rank[code]) if 0 <= code < len(table) else 4096
    return of


# ----------------------------------------------------------------------------- oracles


def oracle_global(length: int, m: int, rank_of) -> set[int]:
    """Global (their Global / CM-Step / CM-GEMS global stage): every position 1..end ranked by
    (rank, position), the first m taken, each with its 11-token span clipped to 1..end."""
    ranked = sorted(range(1, length + 1), key=lambda i: (rank_of(i), i))
    out = set()
    for centre in ranked[:m]:
        out |= {centre + d for d in SPAN_11 if 1 <= centre + d <= length}
    return out


def oracle_genemask(length: int, centres: list[int], rank_of, order: str = "top") -> set[int]:
    """GeneMask (Code-B; CM-GEMS-script stage with order 'first'): each centre's k-span; its
    best-ranked k-span member (the centre first, strict <) is its anchor; with 9+ centres only
    ceil(n/2) anchors: the best ranked ('top') or the first in centre order ('first'); each kept
    anchor's 11-token span."""
    out, anchors = set(), []
    for c in centres:
        out.add(c)
        best, at = rank_of(c), c
        for d in KSPAN:
            i = c + d
            if 1 <= i <= length:
                out.add(i)
                if rank_of(i) < best:
                    best, at = rank_of(i), i
        anchors.append((best, at))
    keep = math.ceil(len(anchors) / 2)
    if keep >= 5:
        anchors = sorted(anchors)[:keep] if order == "top" else anchors[:keep]
    for _, a in anchors:
        out |= {a + d for d in SPAN_11 if 1 <= a + d <= length}
    return out


def chosen(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row).flatten().tolist())


# ----------------------------------------------------------------------------- pmi_lookup


def test_position_lookup_global_is_content_independent_and_matches_the_oracle():
    table = distinct_table(1)
    length, p = 300, 0.0136
    a, npmi_a, attn = rows([length], 1, table)
    b, npmi_b, _ = rows([length], 2, table)
    assert not torch.equal(a, b)
    kw = {"k": K, "mlm_probability": p, "pmi_lookup": "position", "npmi_table": table}
    sel_a = maskings.select("global", a, npmi_a, attn, gen(0), **kw)
    sel_b = maskings.select("global", b, npmi_b, attn, gen(5), **kw)
    assert torch.equal(sel_a, sel_b)
    m = max(1, round(length * p))
    by_position = rank_by_id(table)   # position i read as token id i
    assert chosen(sel_a[0]) == oracle_global(length, m, by_position)
    # Token lookup ranks the sequence's own k-mers: the two differ, each as its oracle says.
    tok_a = maskings.select("global", a, npmi_a, attn, gen(0), k=K, mlm_probability=p)
    tok_b = maskings.select("global", b, npmi_b, attn, gen(0), k=K, mlm_probability=p)
    assert not torch.equal(tok_a, tok_b)
    by_token = rank_by_id(table)
    assert chosen(tok_a[0]) == oracle_global(length, m, lambda i: by_token(int(a[0, i])))


def test_position_lookup_genemask_matches_the_oracle():
    table = distinct_table(2)
    lengths = [510, 200, 37]
    ids, npmi, attn = rows(lengths, 3, table)
    real = maskings.real_tokens(ids, attn)
    looked_up = maskings.lookup_npmi(npmi, "position", table)
    assert torch.allclose(looked_up[0], looked_up[1], equal_nan=True)
    rng = np.random.default_rng(4)
    centres = torch.zeros(ids.shape, dtype=torch.bool)
    for r, n in enumerate(lengths):
        centres[r, 1 + rng.choice(n, size=min(n, 14 - 4 * r), replace=False)] = True
    sel = maskings.genemask_from_centres(centres, real, looked_up, gen(0), k=K)
    by_position = rank_by_id(table)
    for r, n in enumerate(lengths):
        assert chosen(sel[r]) == oracle_genemask(n, sorted(chosen(centres[r])), by_position)


@pytest.mark.parametrize("strategy", ["genemask", "global"])
def test_select_with_position_lookup_is_token_lookup_on_the_position_row(strategy):
    """The option changes only the NPMI the masking reads: same draws, same selection as token
    lookup given the position row as the batch's NPMI."""
    table = distinct_table(3)
    ids, npmi, attn = rows([400, 123, 7], 6, table)
    row = maskings.position_npmi(table, ids.shape[1]).expand(ids.shape)
    assert torch.isnan(row[0, :NUM_SPECIAL]).all()
    pos = maskings.select(strategy, ids, npmi, attn, gen(9), pmi_lookup="position",
                          npmi_table=table)
    tok = maskings.select(strategy, ids, row.clone(), attn, gen(9))
    assert torch.equal(pos, tok)
    _, _, selected = maskings.mask_batch(ids, npmi, attn, strategy, NUM_SPECIAL + 4 ** K,
                                         gen(9), pmi_lookup="position", npmi_table=table)
    assert torch.equal(selected, pos)


def test_position_lookup_needs_the_table_and_a_known_name():
    table = distinct_table(0)
    ids, npmi, attn = rows([50], 0, table)
    with pytest.raises(ValueError, match="needs the NPMI table"):
        maskings.select("global", ids, npmi, attn, gen(0), pmi_lookup="position")
    from cmgems.errors import InputError
    with pytest.raises(InputError, match="pmi_lookup"):
        maskings.select("global", ids, npmi, attn, gen(0), pmi_lookup="id")
    # random reads no NPMI: the lookup does not apply, no table needed
    maskings.select("random", ids, npmi, attn, gen(0), pmi_lookup="position")


def test_config_cli_and_collator_carry_pmi_lookup():
    from cmgems.errors import InputError
    from cmgems.hf import MaskingCollator
    from cmgems.pretrain.config import PretrainConfig, from_sources
    from launchers.pretrain import parse_args
    assert PretrainConfig().pmi_lookup == "token"
    assert from_sources(None, parse_args(["--pmi-lookup", "position"])).pmi_lookup == "position"
    assert PretrainConfig(pmi_lookup="position").pmi_lookup == "position"
    with pytest.raises(InputError, match="pmi_lookup"):
        PretrainConfig(pmi_lookup="kmer")
    table = distinct_table(4).numpy()
    ids, _, _ = rows([60, 60], 7, torch.from_numpy(table))
    features = [{"input_ids": ids[i].numpy()} for i in range(2)]
    coll = MaskingCollator(table, "fixed:global", pmi_lookup="position")
    out = coll(features)
    chosen_rows = (out["labels"] != maskings.IGNORE_INDEX)
    assert torch.equal(chosen_rows[0], chosen_rows[1])
