"""The engine's set-up: AdamW's two parameter groups in a real DeepSpeed engine, precision and
DeepSpeed config checks, models to initialise from."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from conftest import ROOT, run_module
from cmgems.pretrain.config import PretrainConfig
from cmgems.pretrain.engine import build_ds_config, param_groups, resolve_precision
from cmgems.errors import InputError
from cmgems.model.architectures import build_model, bert_config
from cmgems.data.tokens import vocab_size

# A real DeepSpeed engine per ZeRO stage over the real LOGO model; optimizer steps whose
# gradients are all zero. AdamW's update is then its decoupled decay alone, p <- p (1 - lr wd):
# a weight shrinks by exactly that factor, a bias or LayerNorm weight must not move at all.
DECAY_CHECK = r"""
import json, sys, torch
from cmgems.pretrain import distributed
from cmgems.pretrain.config import PretrainConfig
from cmgems.pretrain.engine import build_ds_config, ds_config_path, initialize
from cmgems.model.architectures import build_model
from cmgems.pretrain.trainer import MaskedLM

dist = distributed.init()
report = {}
for stage in (0, 2):
    cfg = PretrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=1, max_steps=10,
                         micro_batch_size=2, grad_accum=1, grad_clip=0.0, zero_stage=stage)
    torch.manual_seed(0)
    model = build_model("logo", 6)
    engine = initialize(MaskedLM(model), build_ds_config(cfg, 1, dist.device),
                        ds_config_path(cfg), cfg.weight_decay)
    names = ("bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.0.attention.self.query.bias",
             "bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight")
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    factor = 1.0
    ids = torch.randint(5, 4101, (2, 16))
    for _ in range(3):  # DeepSpeed's warmup gives lr 0 to the first two steps
        lr = engine.optimizer.param_groups[0]["lr"]
        loss, _, _ = engine(ids, torch.ones_like(ids), ids)
        engine.backward(loss * 0.0)
        engine.step()
        factor *= 1 - lr * 0.5
    groups = [(g["weight_decay"], len(g["params"])) for g in engine.optimizer.param_groups]
    report[stage] = {"factor": factor, "groups": groups, "ratio": {
        n: (params[n].detach() / before[n]).flatten()[:1000].tolist() for n in names},
        "same": {n: bool(torch.equal(params[n].detach(), before[n])) for n in names}}
print("REPORT" + json.dumps(report))
distributed.shutdown()
"""


@pytest.mark.slow
def test_adamw_decays_weights_but_not_biases_or_layernorm():
    res = run_module("-c", DECAY_CHECK, cwd=ROOT)
    report = json.loads(res.stdout.split("REPORT", 1)[1].splitlines()[0])
    for stage, r in report.items():
        factor = r["factor"]
        assert 0 < factor < 0.99, (stage, factor)   # lr > 0 reached the optimizer
        assert [wd for wd, _ in r["groups"]] == [0.5, 0.0], (stage, r["groups"])
        for name in ("bert.encoder.layer.0.attention.self.query.bias",
                     "bert.embeddings.LayerNorm.weight"):
            assert r["same"][name], f"ZeRO-{stage}: {name} moved under zero gradient"
        for name in ("bert.encoder.layer.0.attention.self.query.weight",
                     "bert.embeddings.word_embeddings.weight"):
            assert not r["same"][name]
            ratios = torch.tensor([x for x in r["ratio"][name] if x == x])  # 0/0 is NaN
            assert torch.allclose(ratios, torch.full_like(ratios, factor), atol=1e-5), \
                f"ZeRO-{stage}: {name} decayed by {ratios.min()}..{ratios.max()}, not {factor}"


def test_param_groups_split_by_module_type_and_bias():
    model = BertForMaskedLM(bert_config("logo", 6))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no)
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in yes)
    assert "bert.embeddings.word_embeddings.weight" in yes
    assert "cls.predictions.transform.LayerNorm.weight" in no
    assert len(no) + len(yes) == len(list(model.parameters()))


# ---------------------------------------------------------------------- precision, DeepSpeed JSON
def test_fp16_on_a_cpu_without_fp16_kernels_is_refused():
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().is_fp16_supported():
        pytest.skip(reason="this CPU has fp16 kernels (AVX512-FP16): fp16 is allowed here")
    with pytest.raises(InputError, match="precision fp16: not supported on this device"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("body,message", [
    ([1, 2], "a DeepSpeed config is a JSON object, got list"),
    ({"optimizer": "adam"}, "'optimizer' must be an object, got str 'adam'"),
    ({"optimizer": {"params": {}}}, "'optimizer' needs a \"type\""),
    ({"optimizer": {"type": "AdamW", "params": [1]}}, "optimizer.params must be an object"),
    ({"zero_optimization": 2}, "'zero_optimization' must be an object"),
    ({"gradient_clipping": "x"}, "gradient_clipping must be a number or \"auto\", got 'x'"),
])
def test_malformed_deepspeed_json_is_refused_naming_the_file(tmp_path, body, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    with pytest.raises(InputError) as e:
        build_ds_config(PretrainConfig(ds_config=str(path)), 1, torch.device("cpu"))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_zero_warmup_is_given_to_deepspeed_as_one_step():
    ds = build_ds_config(PretrainConfig(warmup_steps=0), 1, torch.device("cpu"))
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1


# ---------------------------------------------------------------------- --init-from
def _saved(tmp_path, k: int = 6):
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size(k), hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    out = tmp_path / "model"
    model.save_pretrained(out)
    return out, model


def test_init_from_loads_a_saved_model(tmp_path):
    out, model = _saved(tmp_path)
    got = build_model("logo", 6, str(out))
    assert torch.equal(got.bert.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("damage,named,message", [
    ("config not JSON", "config.json", "not a readable BERT config"),
    ("no weights", "", "no weights (model.safetensors or pytorch_model.bin)"),
    ("truncated weights", "model.safetensors", "cannot load the weights"),
    ("weights of another model", "model.safetensors", "does not fill the model"),
    ("NaN weights", "model.safetensors", "holds NaN or infinite values"),
])
def test_init_from_a_broken_model_is_refused_naming_the_file(tmp_path, damage, named, message):
    out, model = _saved(tmp_path)
    weights = out / "model.safetensors"
    if damage == "config not JSON":
        (out / "config.json").write_text("{\"hidden_size\": ")
    elif damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "weights of another model":
        from safetensors.torch import save_file
        save_file({"bert.pooler.dense.bias": torch.zeros(32)}, str(weights))
    else:
        from safetensors.torch import save_file
        state = {k: v.clone() for k, v in model.state_dict().items()
                 if k != "cls.predictions.decoder.weight"}
        state["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("nan")
        save_file(state, str(weights))
    with pytest.raises(InputError) as e:
        build_model("logo", 6, str(out))
    assert str(e.value).startswith(f"{out / named}" if named else f"{out}: "), str(e.value)
    assert message in str(e.value)


def test_auto_precision_is_one_rule_for_pretraining_and_finetuning():
    """`precision: auto` resolves alike in both (bf16 where the GPU has it, else fp32): a model
    finetuned with the settings it was pretrained with runs in the same precision."""
    from cmgems.evaluation.finetune import resolve_precision as finetune_precision
    from cmgems.precision import auto_precision
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available()
                                       else [])
    for device in devices:
        want = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        assert auto_precision(device) == want
        assert resolve_precision("auto", device) == finetune_precision("auto", device) == want


# ---------------------------------------------------------------------- which Adam
def _zero0() -> dict:
    return json.loads((ROOT / "ds_configs" / "zero0.json").read_text())


def test_a_gpu_without_a_cuda_toolkit_trains_with_torch_fused_adamw():
    """DeepSpeed's fused Adam is JIT-compiled with nvcc; the choice follows the same probe the
    trainer asks (fused_adam_available), so this holds on a machine with or without one."""
    from cmgems.pretrain.engine import choose_adam, fused_adam_available

    ds = _zero0()
    choice = choose_adam(ds, torch.device("cuda"))
    available, why = fused_adam_available()
    params = ds["optimizer"]["params"]
    if available:
        assert "torch_adam" not in params and choice.startswith("DeepSpeed fused Adam")
    else:
        assert params["torch_adam"] is True and params["fused"] is True
        assert choice == f"torch AdamW, fused (DeepSpeed's fused Adam: {why})"


@pytest.mark.parametrize("section, expect", [
    ({"optimizer": {"type": "Lamb", "params": {}}}, ""),
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}, ""),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, ""),
])
def test_an_optimizer_the_config_fixes_is_left_as_it_is(section, expect):
    from cmgems.pretrain.engine import choose_adam

    ds = {**_zero0(), **section}
    before = json.dumps(ds, sort_keys=True)
    assert choose_adam(ds, torch.device("cuda")) == expect
    assert json.dumps(ds, sort_keys=True) == before


FUSED_CHECK = r"""
import json, torch
from cmgems.pretrain import distributed
from cmgems.pretrain.engine import initialize, param_groups
from cmgems.model.architectures import build_model
from cmgems.pretrain.trainer import MaskedLM

dist = distributed.init()
ds = json.loads(open("ds_configs/zero0.json").read())
ds["optimizer"]["params"] = {"lr": 1e-3, "torch_adam": True, "fused": True}
ds["scheduler"]["params"] = {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 1,
                             "total_num_steps": 10}
for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
    ds[key] = 1
ds["gradient_clipping"] = 1.0
ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = False
engine = initialize(MaskedLM(build_model("logo", 6)), ds, "zero0.json", 0.01)
opt = engine.optimizer
opt = getattr(opt, "optimizer", opt)
print("OPTIMIZER", type(opt).__name__, opt.defaults.get("fused"))
distributed.shutdown()
"""


def test_deepspeed_hands_the_fused_flag_to_torch_adamw(tmp_path):
    """The fallback's `fused` reaches torch's AdamW through DeepSpeed's config (the CPU has a
    fused AdamW too, so a real engine shows it here)."""
    res = run_module("-c", FUSED_CHECK, cwd=ROOT, timeout=300)
    assert "OPTIMIZER AdamW True" in res.stdout, res.stdout[-2000:]
