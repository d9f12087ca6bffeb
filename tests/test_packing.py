"""Sequence packing: the first-fit plan, the packed layout, and equivalence with one sample per row
(loss, gradients, predicted positions; the SDPA mask path and the variable-length kernel path,
torch's varlen_attn through cmgems' attention function included); the choice of path; end to
end, a short run packed and unpacked gives the same losses and perplexities."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_module
from mlflow.tracking import MlflowClient
from transformers import AttentionInterface, BertConfig, BertForMaskedLM

from cmgems.data import packing
from cmgems.data.loader import collate
from cmgems.data.tokens import CLS_ID, SEP_ID, vocab_size
from cmgems.errors import InputError
from cmgems.masking.maskings import mask_batch
from cmgems.pretrain.trainer import MaskedLM

V6 = vocab_size(6)


def padded_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """The loader's padded batch of samples with these token counts ([CLS]/[SEP] included)."""
    rng = np.random.default_rng(seed)
    return collate([(rng.integers(5, V6, n - 2).astype(np.uint16),
                     rng.normal(size=n - 2).astype(np.float16)) for n in lengths])


def small_model(seed: int = 0) -> MaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V6, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MaskedLM(BertForMaskedLM(cfg))


def masked(batch, strategies, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return mask_batch(batch["input_ids"], batch["npmi"], batch["attention_mask"], strategies, V6,
                      gen, probabilities={"random": 0.05, "genemask": 0.04, "global": 0.03})


def loss_and_grads(model: MaskedLM, inputs: dict):
    model.zero_grad()
    loss, loss_sum, n = model(**inputs)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), loss_sum, n, grads


# ------------------------------------------------------------------------------- the plan
def test_first_fit_keeps_data_order_and_never_splits():
    rows, offsets, fill = packing.first_fit([300, 300, 100, 212, 512, 5], 512)
    assert rows == [0, 1, 0, 1, 2, 0]
    assert offsets == [0, 0, 300, 300, 0, 400]
    assert fill == [405, 512, 512]
    assert packing.first_fit([], 512) == ([], [], [])
    with pytest.raises(ValueError, match="513 tokens"):
        packing.first_fit([10, 513], 512)


def test_plan_lays_whole_samples_back_to_back_with_restarting_positions():
    lengths = [128, 40, 2, 90, 128, 7]
    batch = padded_batch(lengths)
    packer = packing.Packer(True, 128)
    layout = packer.layout(batch)
    rows, offsets, fill = packing.first_fit(lengths, 128)
    assert (rows, offsets, fill) == ([0, 1, 1, 2, 3, 1], [0, 0, 40, 0, 0, 42], [128, 49, 90, 128])
    assert (layout.samples, layout.real_tokens, layout.rows, layout.width) == (6, 395, 4, 128)
    # The dense layers compute the real tokens only; attention covers the rows.
    assert layout.slots == 395 and layout.real_token_share == 1.0
    assert layout.attention_slots == 4 * 128
    labels = torch.arange(batch["input_ids"].numel()).view(batch["input_ids"].shape)
    out = packer.model_inputs(layout, batch["input_ids"], batch["attention_mask"], labels)
    ids, pos, slots = out["input_ids"], out["position_ids"], out["packed_slots"]
    assert ids.shape == pos.shape == out["labels"].shape == (1, 395)
    assert out["attention_mask"] is None
    covered = torch.zeros(4 * 128, dtype=torch.bool)
    start = 0
    for b, (n, r, o) in enumerate(zip(lengths, rows, offsets)):
        # Sample b: next in the one row, and at offset o of attention row r.
        assert torch.equal(ids[0, start:start + n], batch["input_ids"][b, :n])
        assert ids[0, start] == CLS_ID and ids[0, start + n - 1] == SEP_ID
        assert torch.equal(pos[0, start:start + n], torch.arange(n))
        assert torch.equal(out["labels"][0, start:start + n], labels[b, :n])
        assert torch.equal(slots[start:start + n], r * 128 + o + torch.arange(n))
        covered[slots[start:start + n]] = True
        start += n
    assert start == 395 and int(covered.sum()) == 395  # every token in a slot of its own
    mask = out["packed_mask"]
    assert mask.shape == (4, 1, 128, 128) and mask.dtype == torch.bool
    # Row 1 holds samples 1 (0..39), 2 (40..41) and 5 (42..48), then padding (49..127).
    row = mask[1, 0]
    for lo, hi in ((0, 40), (40, 42), (42, 49), (49, 128)):
        inside = torch.zeros(128, dtype=torch.bool)
        inside[lo:hi] = True
        assert torch.equal(row[lo:hi], inside.expand(hi - lo, 128)), (lo, hi)
    assert mask.any(-1).all()  # no query attends to nothing (SDPA would give NaN)


def test_short_samples_never_cost_more_positions_than_padding():
    # Rows of 128 hold 4 + 4 + 2 samples of 30 (3 x 120 positions): 10 rows of 30 are fewer.
    layout = packing.plan(torch.full((10,), 30), 30, 128)
    assert (layout.rows, layout.width, layout.attention_slots) == (10, 30, 300)
    layout = packing.plan(torch.full((8,), 30), 30, 120)  # 2 x 120 = 8 x 30: the narrower rows
    assert (layout.rows, layout.width) == (8, 30)
    layout = packing.plan(torch.tensor([30, 30, 60, 120, 60]), 120, 120)
    assert (layout.rows, layout.width, layout.attention_slots) == (3, 120, 360)  # padded: 5 x 120
    layout = packing.plan(torch.tensor([30, 10, 20]), 30, 64)  # 1 x 60 or 2 x 30: the narrower
    assert (layout.rows, layout.width) == (2, 30)
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = torch.from_numpy(rng.integers(2, 129, rng.integers(1, 20)))
        longest = int(lengths.max())
        assert packing.plan(lengths, longest, 128).attention_slots <= len(lengths) * longest


def test_lengths_come_from_the_loader_when_it_gives_them():
    batch = padded_batch([10, 20])
    assert packing.sample_lengths(batch).tolist() == [10, 20]
    batch["lengths"] = torch.tensor([10, 20], dtype=torch.int32)
    assert packing.sample_lengths(batch).dtype == torch.int64
    off = packing.Packer(False, 128).layout(batch)
    assert (off.plan, off.real_tokens, off.slots, off.attention_slots) == (None, 30, 40, 40)
    assert off.real_token_share == pytest.approx(0.75)


# ------------------------------------------------------------------------- equivalence
LENGTHS = [128, 37, 2, 90, 128, 61, 7, 128, 15, 33]
STRATEGIES = ["genemask", "global", "random", "global", "genemask", "random", "global",
              "global", "genemask", "random"]


def test_packed_batch_equals_one_sample_per_row():
    """Loss, loss sum, predicted count and every gradient of a packed batch match the padded
    batch (CPU fp32, within 1e-5); the predicted positions of each sample are the same."""
    batch = padded_batch(LENGTHS)
    inputs, labels, selected = masked(batch, STRATEGIES)
    model = small_model()
    packer = packing.Packer(True, 128)
    layout = packer.layout(batch)
    assert layout.rows < len(LENGTHS)
    padded = packing.Packer(False, 128)
    ref = loss_and_grads(model, padded.model_inputs(padded.layout(batch), inputs,
                                                    batch["attention_mask"], labels))
    packing.register_attention(packing.ROWS_IMPL)
    model.model.set_attn_implementation(packing.ROWS_IMPL)
    packed_inputs = packer.model_inputs(layout, inputs, batch["attention_mask"], labels)
    got = loss_and_grads(model, packed_inputs)
    assert ref[2] == got[2] == selected.sum() > 0
    assert abs(ref[0] - got[0]) < 1e-5 and abs(ref[1] - got[1]) / ref[1] < 1e-6
    assert ref[3].keys() == got[3].keys()
    worst = max(ref[3], key=lambda k: (ref[3][k] - got[3][k]).abs().max())
    assert (ref[3][worst] - got[3][worst]).abs().max() < 1e-5, worst
    # Per sample: the packed labels of the sample are its own labels, position by position.
    starts = np.cumsum([0, *LENGTHS])
    for b, n in enumerate(LENGTHS):
        assert torch.equal(packed_inputs["labels"][0, starts[b]:starts[b] + n], labels[b, :n])
        assert torch.equal(packed_inputs["input_ids"][0, starts[b]:starts[b] + n], inputs[b, :n])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rows_attention_drops_out_as_the_padded_step(precision):
    """With attention dropout on and samples that fill their rows, the packed step draws its
    dropout masks over the same elements in the same order as the padded one: its loss and
    gradients equal the padded step's, in training (where dropout changes them) and in eval.
    fp32 attends through SDPA, as the padded step's sdpa implementation; bf16 on the CPU through
    transformers' eager attention (packing.rows_kernel), as the padded step's eager one."""
    batch = padded_batch([64] * 6, seed=9)
    inputs, labels, _ = masked(batch, "random", seed=10)
    model = small_model(4)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    for layer in model.model.bert.encoder.layer:
        layer.attention.self.dropout.p = 0.3
    kernel = packing.rows_kernel("cpu", next(model.parameters()).dtype, 0.3)
    assert kernel == {"fp32": "sdpa", "bf16": "eager"}[precision]
    padded = packing.Packer(False, 64)
    packer = packing.Packer(True, 64)
    layout = packer.layout(batch)
    assert (layout.rows, layout.width) == (6, 64)
    packed_inputs = packer.model_inputs(layout, inputs, batch["attention_mask"], labels)
    padded_inputs = padded.model_inputs(padded.layout(batch), inputs, batch["attention_mask"],
                                        labels)
    if kernel == "sdpa":  # the all-true mask SDPA takes over these rows: the same kernel path
        padded_inputs["attention_mask"] = torch.ones(6, 1, 64, 64, dtype=torch.bool)
    results = {}
    for train in (True, False):
        model.train(train)
        for name, inp, impl in (("padded", padded_inputs, kernel if train else "sdpa"),
                                ("packed", packed_inputs, packing.ROWS_IMPL)):
            packing.register_attention(impl)
            model.model.set_attn_implementation(impl)
            torch.manual_seed(11)
            results[train, name] = loss_and_grads(model, inp)

    def gap(a, b):
        return max((a[3][k].float() - b[3][k].float()).abs().max() for k in a[3])

    tol = 1e-5 if precision == "fp32" else 1e-3
    for train in (True, False):
        ref, got = results[train, "padded"], results[train, "packed"]
        assert abs(ref[0].float() - got[0].float()) < tol and gap(ref, got) < tol, train
    assert gap(results[True, "packed"], results[False, "packed"]) > 1e-4  # dropout was on


def test_rows_attention_refuses_a_batch_without_the_rows():
    model = small_model()
    packing.register_attention(packing.ROWS_IMPL)
    model.model.set_attn_implementation(packing.ROWS_IMPL)
    batch = padded_batch([20, 30])
    with pytest.raises(ValueError, match="SDPA over rows takes one packed row"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["input_ids"])


VARLEN_CALLS: list[int] = []


def reference_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                     max_length_k=None, **kwargs):
    """The variable-length kernel's contract, one segment at a time: each sample attends to
    itself only. Refuses a call without the cumulative lengths."""
    VARLEN_CALLS.append(len(cu_seq_lens_q) - 1)
    assert attention_mask is None and query.shape[0] == 1
    assert cu_seq_lens_q is not None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    bounds = cu_seq_lens_q.tolist()
    assert max_length_q == max_length_k == max(b - a for a, b in itertools.pairwise(bounds))
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                            scale=scaling)
             for a, b in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def test_varlen_path_equals_one_sample_per_row():
    """The flash-attention path's inputs (one row, cumulative lengths) through a reference
    variable-length attention give the padded batch's loss and gradients."""
    AttentionInterface.register("cmgems_reference_varlen", reference_varlen)
    batch = padded_batch(LENGTHS, seed=3)
    inputs, labels, _ = masked(batch, "global", seed=4)
    model = small_model(1)
    padded = packing.Packer(False, 128)
    ref = loss_and_grads(model, padded.model_inputs(padded.layout(batch), inputs,
                                                    batch["attention_mask"], labels))
    packer = packing.Packer(True, 128, packing.VARLEN)
    layout = packer.layout(batch)
    assert layout.rows == 1 and layout.real_token_share == 1.0
    assert layout.plan["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(LENGTHS)]).tolist()
    model.model.set_attn_implementation("cmgems_reference_varlen")
    got = loss_and_grads(model, packer.model_inputs(layout, inputs, batch["attention_mask"],
                                                    labels))
    assert VARLEN_CALLS == [len(LENGTHS)] * 2  # once per layer, with one segment per sample
    assert abs(ref[0] - got[0]) < 1e-5
    assert max((ref[3][k] - got[3][k]).abs().max() for k in ref[3]) < 1e-5


def segment_kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None):
    """varlen_attn's contract ([tokens, heads, d], cumulative lengths), one segment at a time:
    the oracle that stands in for torch's CUDA kernel where there is none."""
    assert q.is_contiguous() and q.dim() == 3 and cu_seq_q.dtype == torch.int32
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in itertools.pairwise(bounds))
    return torch.cat([F.scaled_dot_product_attention(
        *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
        for a, b in itertools.pairwise(bounds)])


def test_torch_varlen_attention_function_equals_one_sample_per_row():
    """cmgems' attention function for torch's varlen_attn (layouts in and out, scale, the
    cumulative lengths transformers passes through), over the segment oracle: the padded batch's
    loss and gradients. The real kernel is CUDA-only: test_cuda_packed_paths runs it."""
    AttentionInterface.register("cmgems_varlen_over_oracle", packing.varlen_attention(segment_kernel))
    batch = padded_batch(LENGTHS, seed=7)
    inputs, labels, _ = masked(batch, STRATEGIES, seed=8)
    model = small_model(3)
    padded = packing.Packer(False, 128)
    ref = loss_and_grads(model, padded.model_inputs(padded.layout(batch), inputs,
                                                    batch["attention_mask"], labels))
    packer = packing.Packer(True, 128, packing.VARLEN)
    model.model.set_attn_implementation("cmgems_varlen_over_oracle")
    got = loss_and_grads(model, packer.model_inputs(packer.layout(batch), inputs,
                                                    batch["attention_mask"], labels))
    assert ref[2] == got[2] > 0
    assert abs(ref[0] - got[0]) < 1e-5
    assert max((ref[3][k] - got[3][k]).abs().max() for k in ref[3]) < 1e-5
    # A batch in rows with a mask (the SDPA layout) is refused, not attended across samples.
    model.model.set_attn_implementation("cmgems_varlen_over_oracle")
    sdpa = packing.Packer(True, 128)
    with pytest.raises(ValueError, match="one packed row"):
        model(**sdpa.model_inputs(sdpa.layout(batch), inputs, batch["attention_mask"], labels))


@pytest.mark.parametrize("device, flash, varlen, precision, dropout, head, want", [
    ("cpu", False, False, "fp32", 0.0, 64, (packing.ROWS_IMPL, "CUDA-only")),
    ("cpu", True, True, "bf16", 0.0, 64, (packing.ROWS_IMPL, "CUDA-only")),
    ("cuda", True, True, "fp32", 0.0, 64, (packing.ROWS_IMPL, "fp16/bf16")),
    ("cuda", True, True, "bf16", 0.1, 64, (packing.FLASH_IMPL, "flash-attn is installed")),
    ("cuda", True, False, "fp16", 0.0, 32, (packing.FLASH_IMPL, "flash-attn is installed")),
    ("cuda", False, True, "bf16", 0.0, 32, (packing.TORCH_VARLEN_IMPL, "varlen_attn")),
    ("cuda", False, True, "bf16", 0.1, 64, (packing.ROWS_IMPL, "no attention dropout")),
    ("cuda", False, False, "bf16", 0.0, 64, (packing.ROWS_IMPL, "cannot run here")),
    ("cuda", True, True, "bf16", 0.0, 320, (packing.ROWS_IMPL, "heads of <= 256")),
])
def test_attention_path_follows_what_the_machine_has(device, flash, varlen, precision, dropout,
                                                     head, want):
    choice = packing.attention_path(device, flash, varlen, precision, dropout, head)
    assert choice.implementation == want[0] and want[1] in choice.reason
    assert choice.path == (packing.SDPA if want[0] == packing.ROWS_IMPL else packing.VARLEN)


def test_an_asked_path_is_taken_where_it_runs_and_refused_elsewhere():
    ask = packing.attention_path
    assert ask("cpu", False, False, "fp32", want="sdpa").implementation == packing.ROWS_IMPL
    got = ask("cuda", False, True, "bf16", 0.1, 64, "torch_varlen")
    assert got.implementation == packing.TORCH_VARLEN_IMPL and "not applied" in got.reason
    assert ask("cuda", True, True, "bf16", 0.1, 64, "torch_varlen").path == packing.VARLEN
    assert ask("cuda", True, False, "fp16", want="flash_attn").implementation == packing.FLASH_IMPL
    for args, why in ((("cpu", True, True, "bf16"), "CUDA-only"),
                      (("cuda", False, True, "bf16"), "flash-attn is not installed"),
                      (("cuda", True, True, "fp32"), "fp16/bf16")):
        with pytest.raises(InputError, match=f"packed_attention flash_attn: .*{why}"):
            ask(*args, want="flash_attn")
    with pytest.raises(InputError, match="torch_varlen: .*cannot run here"):
        ask("cuda", True, False, "bf16", want="torch_varlen")
    with pytest.raises(InputError, match="packed_attention must be one of"):
        ask("cuda", True, True, "bf16", want="xformers")


def test_cpu_chooses_sdpa_with_the_block_diagonal_mask(caplog):
    model = small_model()
    with caplog.at_level("INFO", logger="cmgems"):
        packer = packing.choose_attention(model.model, True, 128, torch.device("cpu"), "fp32")
    assert packer.enabled and packer.attention == packing.SDPA
    assert model.model.config._attn_implementation == packing.ROWS_IMPL
    assert "variable-length kernels are CUDA-only (cpu)" in caplog.text
    assert "eager attention" not in caplog.text  # fp32 (and no dropout): SDPA
    model.model.config.attention_probs_dropout_prob = 0.1
    caplog.clear()
    with caplog.at_level("INFO", logger="cmgems"):
        packing.choose_attention(model.model, True, 128, torch.device("cpu"), "bf16")
    assert "in training through transformers' eager attention" in caplog.text
    assert [packing.rows_kernel(*a) for a in (("cpu", torch.bfloat16, 0.0),
                                              ("cuda", torch.bfloat16, 0.1),
                                              ("cpu", torch.float32, 0.1))] == ["sdpa"] * 3
    assert not packing.flash_available(torch.device("cpu"), "bf16")
    assert not packing.torch_varlen_available(torch.device("cpu"))
    assert not packing.choose_attention(model.model, False, 128, torch.device("cpu"),
                                        "fp32").enabled


CUDA_PATHS = [packing.ROWS_IMPL, packing.TORCH_VARLEN_IMPL, packing.FLASH_IMPL]


def cuda_path_unavailable(impl: str) -> str:
    """Why the packed path `impl` cannot run here ("" when it can)."""
    if not torch.cuda.is_available():
        return "needs CUDA (runs in benchmarks/gpu_check.sh)"
    dev = torch.device("cuda")
    if impl == packing.TORCH_VARLEN_IMPL and not packing.torch_varlen_available(dev):
        return "torch's varlen_attn cannot run on this GPU (flash kernel, sm80+)"
    if impl == packing.FLASH_IMPL and not packing.flash_installed():
        return "flash-attn is not installed"
    return ""


@pytest.mark.parametrize("impl", CUDA_PATHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_packed_paths(impl, precision):
    """On a GPU, every packed path that can run there (SDPA with the mask; torch's varlen_attn
    and flash-attn's kernel, 16-bit only) gives the padded batch's loss and gradients, and
    choose_attention picks the path attention_path names."""
    why = cuda_path_unavailable(impl)
    if why:
        pytest.skip(reason=why)
    if impl != packing.ROWS_IMPL and precision == "fp32":
        pytest.skip(reason="the variable-length kernels take fp16/bf16 only")
    packing.register_attention(impl)
    dev = torch.device("cuda")
    batch = padded_batch(LENGTHS, seed=5)
    inputs, labels, _ = masked(batch, STRATEGIES, seed=6)
    model = small_model(2).to(dev)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    ids, mask, lab = (t.to(dev) for t in (inputs, batch["attention_mask"], labels))
    padded = packing.Packer(False, 128)
    ref = loss_and_grads(model, padded.model_inputs(padded.layout(batch), ids, mask, lab))
    path = packing.SDPA if impl == packing.ROWS_IMPL else packing.VARLEN
    packer = packing.Packer(True, 128, path)
    model.model.set_attn_implementation(impl)
    got = loss_and_grads(model, packer.model_inputs(packer.layout(batch), ids, mask, lab))
    assert ref[2] == got[2] > 0
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert abs(ref[1].item() - got[1].item()) <= tol * ref[1].item()
    for k in ref[3]:
        err = (ref[3][k].float() - got[3][k].float()).norm()
        assert err <= 5 * tol * ref[3][k].float().norm() + 1e-6, k
    chosen = packing.choose_attention(small_model(2).model.to(dev), True, 128, dev, precision)
    expected = packing.attention_path("cuda", packing.flash_installed(),
                                      packing.torch_varlen_available(dev), precision, 0.0, 16)
    assert chosen.attention == expected.path


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_training_packed_and_unpacked_gives_the_same_curves(tiny_dataset, tmp_path):
    """LOGO (no dropout) for 8 steps, packed and not: the same samples and masks, so train/loss
    and eval/ppl agree to float rounding at every logged step; packing computes fewer slots."""
    history = {}
    for flag in ("--packing", "--no-packing"):
        out = tmp_path / flag.strip("-")
        run_module(str(ROOT / "launchers" / "pretrain.py"), "--data-dir", str(tiny_dataset),
                   "--output-dir", str(out), "--max-steps", "8", "--micro-batch-size", "6",
                   "--grad-accum", "2", "--max-length", "64", "--eval-interval", "2",
                   "--eval-batches", "2", "--log-interval", "1", "--save-interval", "8",
                   "--num-workers", "0", "--mode", "cm_step", "--warmup-steps", "2", flag)
        run_id = json.loads((out / "result.json").read_text())["mlflow_run_id"]
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        history[flag] = {key: [m.value for m in sorted(client.get_metric_history(run_id, key),
                                                       key=lambda m: m.step)]
                         for key in ("train/loss", "eval/ppl", "eval/ppl_ref",
                                     "perf/real_token_share")}
    packed, padded = history["--packing"], history["--no-packing"]
    for key in ("train/loss", "eval/ppl", "eval/ppl_ref"):
        assert len(packed[key]) == len(padded[key]) > 0, key
        assert np.allclose(packed[key], padded[key], rtol=1e-5, atol=0), key
    assert len(packed["perf/real_token_share"]) == 8
    assert sum(packed["perf/real_token_share"]) > sum(padded["perf/real_token_share"])
