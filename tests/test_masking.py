"""Masking strategies and corruption on constructed batches with known NPMI, and on E. coli."""
from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmgems.masking import maskings
from cmgems.errors import InputError
from cmgems.rng import generator
from cmgems.data.tokens import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, kmer_ids, vocab, vocab_size

ROOT = Path(__file__).resolve().parents[1]
ECOLI = ROOT / "data" / "ecoli_k12_mg1655.fa.gz"
V6 = vocab_size(6)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(lengths: list[int], width: int | None = None, k: int = 6):
    """[CLS] tokens [SEP] [PAD]... rows with the given real lengths; k-mer ids, zero NPMI."""
    width = width or max(lengths) + 2
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 0] = CLS_ID
        ids[row, 1:n + 1] = NUM_SPECIAL + (torch.arange(n) * 7919) % 4 ** k
        ids[row, n + 1] = SEP_ID
        mask[row, :n + 2] = 1
    return ids, torch.zeros(ids.shape), mask


def positions(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(row).flatten().tolist())


def span(lo: int, hi: int) -> set[int]:
    return set(range(lo, hi + 1))


# ----------------------------------------------------------------------------- spans


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_span_extents(k):
    left, right = maskings.kspan(k)
    assert left + right + 1 == k
    assert maskings.pmi_span(k) == (k - 1, k - 1)
    centres = torch.zeros(1, 40, dtype=torch.bool)
    centres[0, 20] = True
    assert positions(maskings.dilate(centres, left, right)[0]) == span(20 - left, 20 + right)
    assert len(positions(maskings.dilate(centres, *maskings.pmi_span(k))[0])) == 2 * k - 1


def test_span_for_k6_is_t_minus_2_to_t_plus_3():
    assert maskings.kspan(6) == (2, 3)
    assert maskings.pmi_span(6) == (5, 5)


# ----------------------------------------------------------------------------- random


def test_random_all_centres_selects_exactly_the_real_tokens():
    ids, npmi, mask = batch([10, 3, 1], width=16)
    sel = maskings.select("random", ids, npmi, mask, gen(), mlm_probability=1.0)
    assert positions(sel[0]) == span(1, 10)
    assert positions(sel[1]) == span(1, 3)
    assert positions(sel[2]) == {1}


def test_random_never_selects_specials_or_pad_and_spans_have_k_tokens():
    ids, npmi, mask = batch([510, 300, 40, 5] * 16, width=512)
    sel = maskings.select("random", ids, npmi, mask, gen(3), k=6)
    real = maskings.real_tokens(ids, mask)
    assert not (sel & ~real).any()
    assert sel.any()
    # Every run of selected tokens not cut by the row's ends is a union of 6-spans: >= 6 long.
    for row in range(sel.shape[0]):
        n = int(real[row].sum())
        s = sel[row, 1:n + 1].int().tolist()
        runs, start = [], None
        for i, v in enumerate(s + [0]):
            if v and start is None:
                start = i
            if not v and start is not None:
                runs.append((start, i - 1))
                start = None
        for a, b in runs:
            if a > 0 and b < n - 1:
                assert b - a + 1 >= 6


def test_random_zero_probability_selects_nothing():
    ids, npmi, mask = batch([100, 50])
    assert not maskings.select("random", ids, npmi, mask, gen(), mlm_probability=0.0).any()


@pytest.mark.parametrize("strategy", maskings.MASKINGS)
def test_empty_rows_and_zero_probability(strategy):
    ids, npmi, mask = batch([0, 20, 0], width=24)
    npmi[:, 3] = 1.0
    sel = maskings.select(strategy, ids, npmi, mask, gen(), mlm_probability=0.0)
    if strategy == "global":  # m = max(1, round(L * p)) still masks one anchor of a real row
        assert positions(sel[1]) == span(1, 8) and not sel[0].any() and not sel[2].any()
    else:
        assert not sel.any()
    full = maskings.select(strategy, ids, npmi, mask, gen(), mlm_probability=1.0)
    assert not full[0].any() and not full[2].any() and full[1].any()


def test_random_fraction_matches_centre_probability():
    ids, npmi, mask = batch([510] * 256, width=512)
    sel = maskings.select("random", ids, npmi, mask, gen(1))
    interior = sel[:, 10:500].float().mean().item()
    expected = 1 - (1 - 0.025) ** 6
    assert abs(interior - expected) < 0.006, (interior, expected)


def test_random_is_deterministic_per_seed():
    ids, npmi, mask = batch([510] * 8, width=512)
    a = maskings.select("random", ids, npmi, mask, gen(7))
    b = maskings.select("random", ids, npmi, mask, gen(7))
    c = maskings.select("random", ids, npmi, mask, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- genemask


def _genemask(centre_rows: list[list[int]], npmi_rows: list[dict[int, float]], width: int,
              lengths: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    lengths = lengths or [width - 2] * len(centre_rows)
    ids, npmi, mask = batch(lengths, width=width)
    centres = torch.zeros(ids.shape, dtype=torch.bool)
    for row, cs in enumerate(centre_rows):
        centres[row, cs] = True
        for pos, v in npmi_rows[row].items():
            npmi[row, pos] = v
    real = maskings.real_tokens(ids, mask)
    return maskings.genemask_from_centres(centres, real, npmi, gen(seed), k=6)


def test_genemask_extends_the_local_best_to_an_11_span():
    # Centre 10: 6-span 8..13, best NPMI at 12 (not the centre). Centre 30: best at 28.
    # A higher NPMI just outside a centre's span (14) must not be picked.
    sel = _genemask([[10, 30]], [{12: 2.0, 9: 1.0, 14: 9.0, 28: 0.5}], width=60)
    assert positions(sel[0]) == span(7, 17) | span(23, 33)


def test_genemask_reads_npmi_per_token_not_per_index():
    # Same centres, NPMI peak moved: the extended span follows the values in the npmi tensor.
    a = _genemask([[10]], [{8: 3.0}], width=40)
    b = _genemask([[10]], [{13: 3.0}], width=40)
    assert positions(a[0]) == span(3, 13)
    assert positions(b[0]) == span(8, 18)


def _spaced(n: int, spacing: int = 12, first: int = 10):
    """n centres `spacing` apart; centre i's best NPMI (value i + 1) at its span's right end."""
    centres = [first + spacing * i for i in range(n)]
    return centres, {c + 3: float(i + 1) for i, c in enumerate(centres)}


@pytest.mark.parametrize("n", [1, 5, 8])
def test_genemask_keeps_all_anchors_below_nine_centres(n):
    centres, values = _spaced(n)
    sel = _genemask([centres], [values], width=140)
    expected = set().union(*(span(c - 2, c + 8) for c in centres))
    assert positions(sel[0]) == expected


@pytest.mark.parametrize("n", [9, 10])
def test_genemask_keeps_top_half_from_nine_centres(n):
    centres, values = _spaced(n)
    sel = _genemask([centres], [values], width=150)
    kept = math.ceil(n / 2)
    # Anchor values grow with i: the last ceil(n/2) centres get 11-spans, the rest 6-spans.
    expected = set()
    for i, c in enumerate(centres):
        expected |= span(c - 2, c + 8) if i >= n - kept else span(c - 2, c + 3)
    assert positions(sel[0]) == expected


def test_genemask_clips_to_real_tokens_and_ranks_rows_independently():
    # Row 0: 9 centres (halving); row 1: 3 centres near the end of a short row (clipping).
    centres0, values0 = _spaced(9)
    sel = _genemask([centres0, [2, 18]], [values0, {1: 1.0, 20: 2.0}], width=150,
                    lengths=[148, 20])
    assert positions(sel[1]) == span(1, 6) | span(15, 20)
    assert len(positions(sel[0])) == 5 * 11 + 4 * 6


def genemask_reference(centres: list[int], values: list[float], length: int) -> set[int]:
    """GeneMask written out with loops, for one sample with distinct NPMI values."""
    chosen, anchors = set(), []
    for t in centres:
        window = range(max(1, t - 2), min(length, t + 3) + 1)
        chosen.update(window)
        best = max(window, key=lambda j: values[j])
        anchors.append((values[best], best))
    anchors.sort(reverse=True)
    if len(anchors) >= 9:
        anchors = anchors[:math.ceil(len(anchors) / 2)]
    for _, a in anchors:
        chosen.update(range(max(1, a - 5), min(length, a + 5) + 1))
    return chosen


def test_genemask_matches_a_loop_reference_on_random_inputs():
    lengths = [510, 400, 100, 37, 12, 510, 250, 510]
    ids, _, mask = batch(lengths, width=512)
    npmi = torch.randn(ids.shape, generator=gen(21))  # distinct values: no ties to break
    real = maskings.real_tokens(ids, mask)
    rates = torch.tensor([0.0176, 0.03, 0.05, 0.1, 0.3, 0.002, 0.02, 0.04]).unsqueeze(1)
    centres = (torch.rand(ids.shape, generator=gen(22)) < rates) & real
    sel = maskings.genemask_from_centres(centres, real, npmi, gen(23), 6)
    counts = centres.sum(1).tolist()
    assert min(counts) < 9 <= max(counts)
    for row, n in enumerate(lengths):
        expected = genemask_reference(positions(centres[row]), npmi[row].tolist(), n)
        assert positions(sel[row]) == expected, row


def test_genemask_public_select_matches_its_centres():
    ids, npmi, mask = batch([510] * 32, width=512)
    npmi = torch.randn(ids.shape, generator=gen(5))
    sel = maskings.select("genemask", ids, npmi, mask, gen(11))
    # Rebuild the same draws: the centres first, then the tie-break noise from the same stream.
    g = gen(11)
    real = maskings.real_tokens(ids, mask)
    centres = torch.zeros(ids.numel(), dtype=torch.bool)
    centres[maskings.bernoulli_positions(ids.numel(), 0.0176, g, "cpu")] = True
    centres = centres.view(ids.shape) & real
    assert centres.any()
    expected = maskings.genemask_from_centres(centres, real, npmi, g, 6)
    assert torch.equal(sel, expected)
    assert (maskings.dilate(centres, 2, 3) & real & ~sel).sum() == 0


@pytest.mark.parametrize("p", [0.0176, 0.3])
def test_bernoulli_positions_rate_and_independence(p):
    count = 400_000
    at = maskings.bernoulli_positions(count, p, gen(9), "cpu")
    assert at.dtype == torch.int64 and (at[1:] > at[:-1]).all()
    assert 0 <= int(at[0]) and int(at[-1]) < count
    hits = torch.zeros(count)
    hits[at] = 1
    sd = math.sqrt(p * (1 - p) / count)
    assert abs(hits.mean().item() - p) < 5 * sd
    # Successes are independent: P(next is a success | this one is) is p again.
    after = hits[1:][hits[:-1] == 1].mean().item()
    assert abs(after - p) < 5 * math.sqrt(p * (1 - p) / int(hits.sum()))
    assert torch.equal(at, maskings.bernoulli_positions(count, p, gen(9), "cpu"))
    assert maskings.bernoulli_positions(count, 0.0, gen(9), "cpu").numel() == 0
    assert maskings.bernoulli_positions(5, 1.0, gen(9), "cpu").tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- global


def test_global_selects_exactly_the_m_highest_with_11_spans():
    ids, npmi, mask = batch([510], width=512)
    peaks = [2, 60, 120, 200, 300, 400, 505, 250]  # eight peaks: m = round(510 * 0.0136) = 7
    for i, p in enumerate(peaks):
        npmi[0, p] = 10.0 - i  # the last one (250) is the 8th best: left out
    npmi[0, 0] = npmi[0, 511] = 50.0  # specials with a high value are never chosen
    sel = maskings.select("global", ids, npmi, mask, gen())
    expected = set().union(*(span(max(1, p - 5), min(510, p + 5)) for p in peaks[:7]))
    assert positions(sel[0]) == expected


def test_global_m_is_at_least_one_and_follows_length():
    ids, npmi, mask = batch([10, 100, 510], width=512)
    npmi[:, 5] = 1.0
    npmi[2, 100] = npmi[2, 200] = npmi[2, 300] = npmi[2, 400] = npmi[2, 450] = npmi[2, 30] = 1.0
    sel = maskings.select("global", ids, npmi, mask, gen())
    assert positions(sel[0]) == span(1, 10)          # m = max(1, round(0.136)) = 1
    assert positions(sel[1]) == span(1, 10)          # m = round(1.36) = 1
    # m = 7: six disjoint 11-spans and the one at 5, clipped to 1..10
    assert positions(sel[2]) == span(1, 10).union(*(span(p - 5, p + 5)
                                                    for p in (30, 100, 200, 300, 400, 450)))


def test_global_m_per_sample_or_fixed():
    length = torch.tensor([0, 1, 10, 36, 37, 110, 255, 510])
    assert maskings.global_anchors(length, 0.0136).tolist() == [0, 1, 1, 1, 1, 1, 3, 7]
    assert maskings.global_anchors(length, 0.0136, global_m=7).tolist() == [0, 1, 7, 7, 7, 7, 7, 7]
    assert maskings.global_anchors(length, 0.5, global_m=2).tolist() == [0, 1, 2, 2, 2, 2, 2, 2]


def test_global_fixed_m_takes_the_same_count_in_every_sample():
    ids, npmi, mask = batch([50, 200, 510], width=512)
    peaks = [3, 20, 36]  # three disjoint 11-spans that fit every sample
    for row in range(3):
        for i, p in enumerate(peaks):
            npmi[row, p] = 9.0 - i
        npmi[row, 38] = 1.0  # 4th best: left out with global_m = 3
    sel = maskings.select("global", ids, npmi, mask, gen(), global_m=3)
    expected = set().union(*(span(max(1, p - 5), p + 5) for p in peaks))
    assert all(positions(sel[row]) == expected for row in range(3))
    # Per sample (default): 200 tokens give m = 3 as well, 50 give 1, 510 give 7.
    default = maskings.select("global", ids, npmi, mask, gen())
    assert positions(default[0]) == span(1, 8) and positions(default[1]) == expected
    assert len(positions(default[2])) > len(expected)
    # A fixed m larger than a sample: every real token of it, nothing outside.
    ids, npmi, mask = batch([6, 300], width=302)
    sel = maskings.select("global", ids, npmi, mask, gen(), global_m=300)
    assert positions(sel[0]) == span(1, 6) and sel[1].sum() == 300
    _, _, via_batch = maskings.mask_batch(ids, npmi, mask, ["global", "random"], V6, gen(),
                                         probabilities={"random": 0.0}, global_m=50)
    assert positions(via_batch[0]) == span(1, 6) and via_batch[1].sum() == 0
    for bad in (-1, 2.5):
        with pytest.raises(InputError, match="global_m"):
            maskings.select("global", ids, npmi, mask, gen(), global_m=bad)


def test_global_breaks_ties_with_the_generator():
    ids, npmi, mask = batch([510], width=512)
    for i, p in enumerate([20, 60, 100, 140, 180, 220]):
        npmi[0, p] = 5.0 + i
    tied = [300, 350, 400]
    npmi[0, tied] = 1.0
    chosen = []
    for seed in range(40):
        sel = maskings.select("global", ids, npmi, mask, gen(seed))
        picks = [t for t in tied if sel[0, t]]
        assert len(picks) == 1 and sel[0].sum() == 77
        assert torch.equal(sel, maskings.select("global", ids, npmi, mask, gen(seed)))
        chosen.append(picks[0])
    assert set(chosen) == set(tied)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_global_pmi_span_follows_k(k):
    ids, npmi, mask = batch([30], width=32, k=k)
    npmi[0, 15] = 2.0
    sel = maskings.select("global", ids, npmi, mask, gen(), k=k)
    assert positions(sel[0]) == span(15 - (k - 1), 15 + (k - 1))


def test_global_ranks_unscored_tokens_lowest():
    ids, npmi, mask = batch([30], width=32)
    npmi[0, 1:31] = float("nan")
    npmi[0, 12] = -3.0
    npmi[0, 20] = float("-inf")
    sel = maskings.select("global", ids, npmi, mask, gen())
    assert positions(sel[0]) == span(7, 17)


# ----------------------------------------------------------------------------- corrupt


def test_corrupt_proportions_and_labels():
    ids, _, mask = batch([510] * 128, width=512)
    real = maskings.real_tokens(ids, mask)
    selected = real.clone()
    selected[:, ::3] = False
    inputs, labels = maskings.corrupt(ids, selected, V6, gen(2))
    n = int(selected.sum())
    masked = (inputs == MASK_ID) & selected
    unchanged = (inputs == ids) & selected
    replaced = selected & ~masked & ~unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    # unchanged: 10 % plus the 1/4096 of random draws that hit the original k-mer
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01
    assert (inputs[replaced] >= NUM_SPECIAL).all() and (inputs[replaced] < V6).all()
    assert torch.equal(inputs[~selected], ids[~selected])
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == -100).all()
    # replacements cover the k-mer vocabulary, not a corner of it: about 4,350 draws over
    # 4,096 k-mers hit about 2,680 distinct ones
    drawn = inputs[replaced]
    assert drawn.unique().numel() > 2400
    assert drawn.min() < NUM_SPECIAL + 100 and drawn.max() >= V6 - 100


def test_corrupt_without_selection_changes_nothing():
    ids, _, mask = batch([20, 5])
    inputs, labels = maskings.corrupt(ids, torch.zeros(ids.shape, dtype=torch.bool), V6, gen())
    assert torch.equal(inputs, ids) and (labels == -100).all()


def test_corrupt_is_deterministic_per_seed():
    ids, _, mask = batch([510] * 4, width=512)
    sel = maskings.real_tokens(ids, mask)
    a = maskings.corrupt(ids, sel, V6, gen(4))
    b = maskings.corrupt(ids, sel, V6, gen(4))
    c = maskings.corrupt(ids, sel, V6, gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


# ----------------------------------------------------------------------------- mask_batch


def test_mask_batch_mixes_strategies_per_sample():
    ids, npmi, mask = batch([510] * 6, width=512)
    for i, p in enumerate([20, 90, 160, 230, 300, 370, 440]):
        npmi[:, p] = 5.0 + i
    names = ["global", "random", "global", "random", "random", "global"]
    g = generator(0, 10, 0, "mask")
    inputs, labels, sel = maskings.mask_batch(ids, npmi, mask, names, V6, g, k=6,
                                             probabilities={"random": 0.0})
    for row, name in enumerate(names):
        assert sel[row].sum() == (77 if name == "global" else 0)
    assert torch.equal(labels != -100, sel)
    again = maskings.mask_batch(ids, npmi, mask, names, V6, generator(0, 10, 0, "mask"),
                               probabilities={"random": 0.0})
    assert all(torch.equal(x, y) for x, y in zip((inputs, labels, sel), again))


def test_mask_batch_single_name_and_errors():
    ids, npmi, mask = batch([510] * 2, width=512)
    _, _, sel = maskings.mask_batch(ids, npmi, mask, "random", V6, gen(), k=6,
                                   probabilities={"random": 1.0})
    assert sel.sum() == 2 * 510
    with pytest.raises(InputError, match="unknown 'bert'"):
        maskings.mask_batch(ids, npmi, mask, ["random", "bert"], V6, gen())
    with pytest.raises(InputError, match="k"):
        maskings.select("random", ids, npmi, mask, gen(), k=7)
    with pytest.raises(ValueError, match="3 strategies for a batch of 2"):
        maskings.mask_batch(ids, npmi, mask, ["random"] * 3, V6, gen())


def test_masking_leaves_the_global_rng_alone():
    ids, npmi, mask = batch([510] * 4, width=512)
    state = torch.random.get_rng_state()
    for s in maskings.MASKINGS:
        maskings.mask_batch(ids, npmi, mask, s, V6, gen())
        maskings.mask_batch(ids, npmi, mask, s, V6, None)
    assert torch.equal(state, torch.random.get_rng_state())


# ----------------------------------------------------------------------------- mask_stats


def test_mask_stats_figures():
    ids, npmi, mask = batch([10, 10], width=14)
    npmi[:, 1:11] = torch.arange(10, dtype=torch.float32)
    npmi[1, 4] = float("nan")
    sel = torch.zeros(ids.shape, dtype=torch.bool)
    sel[0, [2, 3, 4, 8]] = True  # two spans
    sel[1, [4, 10]] = True       # two spans, one NaN
    stats = maskings.mask_stats(sel, npmi, mask, ["random", "global"])
    assert stats["selected_fraction"] == pytest.approx(6 / 20)
    assert stats["spans_per_sample"] == pytest.approx(2.0)
    assert stats["npmi_selected"] == pytest.approx((1 + 2 + 3 + 7 + 9) / 5)
    assert stats["npmi_real"] == pytest.approx((45 + 45 - 3) / 19)
    assert stats["mix_random"] == 0.5 and stats["mix_global"] == 0.5
    assert stats["mix_genemask"] == 0.0
    assert maskings.mask_stats(sel, npmi, mask, "genemask")["mix_genemask"] == 1.0


# ----------------------------------------------------------------------------- E. coli


def load_npmi_by_id(path: Path) -> torch.Tensor:
    """NPMI per 6-mer token id (NaN at specials) from a table in GeneMask's CSV layout."""
    table = torch.full((V6,), float("nan"))
    index = {kmer: i for i, kmer in enumerate(vocab(6))}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            table[index[row["ngram"]]] = float(row["norm_dp_true_pmi"])
    return table


def ecoli_batch(n: int, npmi_csv: Path, tokens: int = 510, seed: int = 0):
    """n random windows of the E. coli genome as [CLS] 510 tokens [SEP] rows, with NPMI."""
    with gzip.open(ECOLI, "rt") as f:
        seq = "".join(line.strip() for line in f if not line.startswith(">"))
    ids = torch.from_numpy(kmer_ids(seq, 6))
    starts = torch.from_numpy(np.random.default_rng(seed).integers(0, len(ids) - tokens, n))
    rows = ids[starts.unsqueeze(1) + torch.arange(tokens)]
    full = torch.cat([torch.full((n, 1), CLS_ID), rows, torch.full((n, 1), SEP_ID)], 1)
    return full, load_npmi_by_id(npmi_csv)[full], torch.ones_like(full)


@pytest.fixture(scope="module")
def ecoli(genemask_csv):
    return ecoli_batch(512, genemask_csv)


@pytest.mark.parametrize("strategy,low,high", [("random", 0.13, 0.15), ("genemask", 0.13, 0.17),
                                               ("global", 0.11, 0.16)])
def test_mask_fraction_on_ecoli_is_near_15_percent(ecoli, strategy, low, high):
    ids, npmi, mask = ecoli
    sel = maskings.select(strategy, ids, npmi, mask, generator(0, 0, 0, "mask"))
    stats = maskings.mask_stats(sel, npmi, mask, strategy)
    print(f"{strategy}: {stats}")
    assert low < stats["selected_fraction"] < high
    if strategy != "random":  # PMI strategies pick above-average NPMI
        assert stats["npmi_selected"] > stats["npmi_real"]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", maskings.MASKINGS)
def test_cuda_matches_cpu(ecoli, strategy):
    ids, npmi, mask = (t[:64] for t in ecoli)
    cpu = maskings.mask_batch(ids, npmi, mask, strategy, V6, generator(1, 2, 0, "mask"))
    cuda = maskings.mask_batch(ids.cuda(), npmi.cuda(), mask.cuda(), strategy, V6,
                              generator(1, 2, 0, "mask"))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda and torch.equal(a, b.cpu())


def test_global_m_is_a_validated_config_field():
    from cmgems.pretrain.config import PretrainConfig
    assert PretrainConfig().global_m == 0  # per sample, round(L x p_global), by default
    assert PretrainConfig(global_m=7).global_m == 7
    with pytest.raises(InputError, match="global_m must be an integer >= 0"):
        PretrainConfig(global_m=-1)
