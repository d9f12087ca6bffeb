"""The authors' published-code readings as options, each against a loop oracle written from
reading their functions (docs/reproducing.md): the oracles loop over positions on purpose, the
product does not."""
from __future__ import annotations

import itertools
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


# ----------------------------------------------------------------------------- global_m binomial


def test_binomial_m_counts_bernoulli_centres_mean_lp_and_can_be_zero():
    table = distinct_table(5)
    length, p = 200, 0.0136
    ids, npmi, attn = rows([length], 8, table)
    real = maskings.real_tokens(ids, attn)
    ms = [int(maskings.global_anchors(real.sum(1), p, "binomial", real, gen(s))[0])
          for s in range(400)]
    assert abs(np.mean(ms) - length * p) < 4 * math.sqrt(length * p * (1 - p) / 400)
    assert 0 in ms                      # P(m = 0) = (1 - p)^200 = 6.5 %
    by_token = rank_by_id(table)
    for s in range(20):                 # the selection is the oracle's for the m drawn
        sel = maskings.select("global", ids, npmi, attn, gen(s), mlm_probability=p,
                              global_m="binomial")
        assert chosen(sel[0]) == oracle_global(length, ms[s], lambda i: by_token(int(ids[0, i])))


def test_global_m_values_are_validated():
    from cmgems.errors import InputError
    from cmgems.pretrain.config import PretrainConfig
    table = distinct_table(0)
    ids, npmi, attn = rows([50], 0, table)
    for bad in ("bin", -1, 1.5, True):
        with pytest.raises(InputError, match="global_m"):
            maskings.select("global", ids, npmi, attn, gen(0), global_m=bad)
        with pytest.raises(InputError, match="global_m"):
            PretrainConfig(global_m=bad)
    assert PretrainConfig(global_m="binomial").global_m == "binomial"


# ----------------------------------------------------------------------------- anchor order


@pytest.mark.parametrize("order", ["top", "first"])
def test_genemask_anchor_order_matches_the_oracle(order):
    table = distinct_table(6)
    lengths = [510, 300]
    ids, npmi, attn = rows(lengths, 9, table)
    real = maskings.real_tokens(ids, attn)
    rng = np.random.default_rng(10)
    centres = torch.zeros(ids.shape, dtype=torch.bool)
    for r, n in enumerate(lengths):       # 12 and 9 centres: both halve
        centres[r, 1 + rng.choice(n, size=12 - 3 * r, replace=False)] = True
    sel = maskings.genemask_from_centres(centres, real, npmi, gen(0), k=K, anchor_order=order)
    by_token = rank_by_id(table)
    for r, n in enumerate(lengths):
        expect = oracle_genemask(n, sorted(chosen(centres[r])),
                                 lambda i, r=r: by_token(int(ids[r, i])), order)
        assert chosen(sel[r]) == expect
    if order == "first":
        top = maskings.genemask_from_centres(centres, real, npmi, gen(0), k=K)
        assert not torch.equal(top, sel)


# ----------------------------------------------------------------------------- switch rules


def oracle_switch(perplexities: list[float], threshold: float) -> int | None:
    """The published CM-GEMS script: before each masking it rereads every perplexity so far and
    switches once the smallest |change| between consecutive ones is below the threshold; the
    index of the evaluation after which it masks with global."""
    for n in range(2, len(perplexities) + 1):
        seen = perplexities[:n]
        smallest = 10000.0
        for a, b in itertools.pairwise(seen):
            smallest = min(smallest, abs(b - a))
        if smallest < threshold:
            return n - 1
    return None


def switch_index(rule: str, perplexities: list[float], threshold: float = 1.0,
                 patience: int = 1) -> int | None:
    from cmgems.masking.curriculum import make_schedule
    s = make_schedule("cm_gems", 1000, threshold=threshold, patience=patience, switch_rule=rule)
    for i, ppl in enumerate(perplexities):
        if s.observe(10 * i, ppl) is not None:
            return i
    return None


@pytest.mark.parametrize("ppl", [[100, 90, 95, 94.5, 80, 79.8], [50, 40, 30, 29.5, 29.4],
                                 [10, 20, 30], [300, 200, 150, 120]])
def test_switch_rules_on_fixed_sequences(ppl):
    expect = oracle_switch(ppl, 1.0)
    assert switch_index("min_abs_change", ppl) == expect
    assert switch_index("abs_change", ppl) == expect      # the same decision at patience 1
    drops = [a - b for a, b in itertools.pairwise(ppl)]
    first_drop = next((i + 1 for i, d in enumerate(drops) if d < 1.0), None)
    assert switch_index("drop", ppl) == first_drop


def test_switch_rules_differ_where_the_readings_do():
    rise = [100, 90, 95, 94.5]          # a rise is below any threshold for the signed drop
    assert (switch_index("drop", rise), switch_index("abs_change", rise)) == (2, 3)
    # patience 2: the smallest change so far stays below; two small changes in a row never came
    ppl = [100, 99.5, 90, 89.7, 80]
    assert switch_index("min_abs_change", ppl, patience=2) == 2
    assert switch_index("abs_change", ppl, patience=2) is None
    from cmgems.errors import InputError
    with pytest.raises(InputError, match="switch_rule"):
        switch_index("smallest", ppl)


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset,model", [("published-code.yaml", "dnabert"),
                                          ("published-code-logo.yaml", "logo")])
def test_published_code_presets_set_every_reading(preset, model):
    from conftest import ROOT

    from cmgems.pretrain.config import from_sources
    from launchers.pretrain import parse_args
    path = ROOT / "launchers" / "configs" / preset
    cfg = from_sources(str(path), parse_args([]))
    assert cfg.model == model
    published = {"pmi_lookup": "position", "global_m": "binomial", "genemask_anchor_order":
                 "first", "switch_rule": "min_abs_change", "eval_masking": "fresh",
                 "p_genemask": 0.0176, "eval_interval": 500, "eval_batches": 0,
                 "precision": "fp32", "cm_step_draw": "batch", "threshold": 1.0,
                 "mode": "cm_gems", "max_steps": 10_000, "lr": 8e-4, "seed": 42}
    for name, value in published.items():
        assert getattr(cfg, name) == value, name
    assert cfg.micro_batch_size * cfg.grad_accum == 250
    assert "--sampling genemask" in path.read_text()


# ----------------------------------------------------------------------------- sampling


def test_genemask_piece_bounds_follow_the_notebook():
    from preprocessing import genemask_samples as gs
    sizes, firsts = [], []
    for seed in range(30):
        starts, ends = gs.piece_bounds(60_000, np.random.default_rng(seed))
        firsts.append(int(starts[0]))
        assert (starts[1:] == ends[:-1]).all()          # back to back
        assert ends[-1] <= 60_000 - 1                   # the last base is never used
        sizes.append(ends[:-1] - starts[:-1])           # the last piece may be cut short
    sizes = np.concatenate(sizes)
    assert max(firsts) < 1000 and len(set(firsts)) > 20
    assert set(np.unique(sizes)) <= {511, *range(6, 511)}
    assert abs(np.mean(sizes == 511) - 0.5) < 0.03
    assert sizes[sizes != 511].min() <= 10 and sizes[sizes != 511].max() >= 505


def test_sampling_genemask_build(tmp_path):
    """N removed and flanks joined, no duplicates, split per sample, recorded; another sampling
    into the same directory is refused."""
    from conftest import LAMBDA, read_genome, run_module

    from cmgems.data.shards import Manifest, ShardSet
    from cmgems.data.tokens import UNK_ID, vocab
    lam = read_genome(LAMBDA).upper()
    repeat = "A" * 20_000                                # its 511-nt pieces are all the same
    with_n = lam[:20_000] + "N" * 300 + lam[20_000:40_000]
    fasta = tmp_path / "g.fa"
    fasta.write_text(f">r1\n{with_n}\n>r2\n{repeat}\n>r3\n{lam}\n")
    out = tmp_path / "gm"
    run_module("-m", "preprocessing", "build", str(fasta), str(out), "--min-count", "5",
               "--valid-fraction", "0.1", "--seed", "3", "--sampling", "genemask")
    manifest = Manifest.load(out)
    assert manifest.params["sampling"] == "genemask"
    names = vocab(K)
    texts = []
    for split in ("train", "valid"):
        shards = ShardSet(out, split, manifest)
        for i in range(len(shards)):
            tokens, _ = shards[i]
            assert (tokens != UNK_ID).all()
            kmers = [names[t] for t in tokens.tolist()]
            texts.append(kmers[0] + "".join(km[-1] for km in kmers[1:]))
    joined = with_n.replace("N", "")
    assert all(len(t) - K + 1 in {506, *range(1, 506)} for t in texts)
    assert len(set(texts)) == len(texts)                 # duplicates removed
    assert sum(t == "A" * 511 for t in texts) == 1
    across = [t for t in texts if lam[19_990:20_000] in t and lam[20_000:20_010] in t]
    assert across and all(t in joined for t in across)   # a piece across the joined flanks
    n_valid = len(ShardSet(out, "valid", manifest))
    assert 0.05 < n_valid / len(texts) < 0.16
    res = run_module("-m", "preprocessing", "build", str(fasta), str(out), "--min-count", "5",
                     "--valid-fraction", "0.1", "--seed", "3", check=False)
    assert res.returncode == 2 and "sampling" in res.stderr


@pytest.mark.slow
def test_published_code_options_train(tmp_path):
    """A tiny real run with every published-code option on a GeneMask-sampled dataset."""
    import json

    from conftest import LAMBDA, run_module
    data = tmp_path / "gm"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(data), "--min-count", "5",
               "--valid-fraction", "0.1", "--seed", "0", "--sampling", "genemask")
    res = run_module("launchers/pretrain.py", "--data-dir", str(data), "--max-steps", "8",
                     "--eval-interval", "2", "--threshold", "1000", "--pmi-lookup", "position",
                     "--global-m", "binomial", "--genemask-anchor-order", "first",
                     "--switch-rule", "min_abs_change", "--eval-masking", "fresh",
                     "--eval-batches", "0", "--precision", "fp32", "--num-workers", "0",
                     "--output-dir", str(tmp_path / "run"), "--no-system-metrics",
                     "--no-log-model", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    result = json.loads(res.stdout)
    assert result["step"] == 8 and result["stage"] == "global"
    ppl = result["events"][0]["perplexity_history"]
    assert all(math.isfinite(p) for p in ppl)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["pmi_lookup"] == "position" and config["global_m"] == "binomial"


@pytest.mark.slow
def test_final_perplexities_use_the_text_masking_whatever_trained_the_model(tmp_path):
    """The frozen-masking matrix scores every model alike: a position-lookup run reports the same
    final perplexities as the same weights scored by a token-lookup run."""
    import json

    from conftest import LAMBDA, run_module
    data = tmp_path / "lam"
    run_module("-m", "preprocessing", "build", str(LAMBDA), str(data), "--min-count", "5",
               "--valid-fraction", "0.1", "--seed", "0")
    finals = []
    for lookup in ("token", "position"):
        # 1 step at lr ~0 (warmup): the same weights in both runs, only the option differs
        res = run_module("launchers/pretrain.py", "--data-dir", str(data), "--max-steps", "1",
                         "--mode", "fixed:random", "--pmi-lookup", lookup, "--num-workers", "0",
                         "--output-dir", str(tmp_path / lookup), "--no-system-metrics",
                         "--no-log-model", "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
        result = json.loads(res.stdout)
        finals.append(json.loads((tmp_path / lookup / "result.json").read_text())["final_ppl"])
        assert result["step"] == 1
    assert finals[0] == finals[1]
