"""The DeepSpeed engine: its JSON config (from ds_configs/, "auto" values filled from our config),
the precision the device can run, and AdamW's two parameter groups."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cmgems import bundled
from cmgems.pretrain.config import PretrainConfig
from cmgems.errors import InputError
from cmgems.precision import auto_precision

DS_CONFIG_DIR = bundled.path("ds_configs")
log = logging.getLogger("cmgems")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in; a 16-bit one the device cannot run is an InputError up front
    (DeepSpeed would otherwise fail deep inside its engine with a traceback)."""
    if precision == "auto":
        return auto_precision(device)
    if precision == "fp32":
        return precision
    if device.type == "cuda":
        ok = precision == "fp16" or torch.cuda.is_bf16_supported()
    else:
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        ok = bool(acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported())
    if not ok:
        other = "bf16 or fp32" if precision == "fp16" else "fp32"
        raise InputError(f"precision {precision}: not supported on this device ({device.type}: "
                         f"DeepSpeed has no {precision} kernels for it); use {other}, or auto")
    return precision


def ds_config_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.ds_config) if cfg.ds_config else DS_CONFIG_DIR / f"zero{cfg.zero_stage}.json"


def _check_sections(ds, path: Path) -> None:
    """The shape DeepSpeed assumes without checking (it fails on a list or a string with an
    AttributeError deep inside)."""
    if not isinstance(ds, dict):
        raise InputError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    for key in ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16"):
        if key in ds and not isinstance(ds[key], dict):
            raise InputError(f"{path}: {key!r} must be an object, got "
                             f"{type(ds[key]).__name__} {ds[key]!r}")
    for key in ("optimizer", "scheduler"):
        section = ds.get(key, {})
        if section and not isinstance(section.get("type"), str):
            raise InputError(f"{path}: {key!r} needs a \"type\" (a name such as "
                             f"{'AdamW' if key == 'optimizer' else 'WarmupDecayLR'})")
        if not isinstance(section.get("params", {}), dict):
            raise InputError(f"{path}: {key}.params must be an object")
    for key in ("gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):
        value = ds.get(key, 0)
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{path}: {key} must be a number or \"auto\", got {value!r}")


def build_ds_config(cfg: PretrainConfig, world_size: int, device: torch.device,
                    announce: bool = True) -> dict:
    """The run's DeepSpeed config, "auto" fields filled. announce=False: a check before the run
    (preflight), which must not log the optimizer the run itself will log on its device."""
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read DeepSpeed config ({e})") from None
    _check_sections(ds, path)
    precision = resolve_precision(cfg.precision, device)
    values = {
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "lr": cfg.lr, "warmup_max_lr": cfg.lr,
        "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps, "weight_decay": cfg.weight_decay,
        # DeepSpeed's WarmupLR refuses 0 and warms up over at least 2 steps whatever it is given.
        "warmup_num_steps": max(1, cfg.warmup_steps), "total_num_steps": cfg.max_steps,
    }

    def fill(node, section=""):
        if isinstance(node, dict):
            out = {}
            for key, v in node.items():
                if v == "auto":
                    if key == "enabled":
                        v = precision == section
                    elif key in values:
                        v = values[key]
                    else:
                        raise InputError(f"{path}: no value for \"auto\" field {key!r}")
                out[key] = fill(v, key)
            return out
        return node

    ds = fill(ds)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not cfg.ds_config:
        zero["stage"] = cfg.zero_stage
    for key, want in (("train_micro_batch_size_per_gpu", cfg.micro_batch_size),
                      ("gradient_accumulation_steps", cfg.grad_accum),
                      ("train_batch_size", cfg.micro_batch_size * cfg.grad_accum * world_size)):
        if ds.get(key, want) != want:
            raise InputError(f"{path}: {key}={ds[key]} contradicts the run config ({want}); "
                             f"set it to \"auto\"")
    choice = choose_adam(ds, device)
    if choice and announce:
        log.info("optimizer: %s", choice)
    return ds


def fused_adam_available() -> tuple[bool, str]:
    """Whether DeepSpeed's fused Adam can run here: prebuilt into the wheel, or buildable (its
    JIT build needs nvcc, which a pip-only GPU machine lacks); and why, in words."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    if installed_ops.get("fused_adam"):
        return True, "prebuilt"
    if CUDA_HOME is not None:
        return True, f"built once with the CUDA toolkit in {CUDA_HOME}"
    return False, "no CUDA toolkit (nvcc) to build it"


def choose_adam(ds: dict, device: torch.device) -> str:
    """Set in `ds` which Adam an Adam/AdamW config trains with; returns the choice in words (""
    where it is not ours to make: another optimizer, an explicit torch_adam, ZeRO-Offload's
    CPU Adam).

    DeepSpeed's fused Adam is a CUDA kernel compiled on first use; where it cannot be, torch's
    AdamW trains instead (its fused kernel on CUDA), rather than the run dying in a compile."""
    optimizer = ds.get("optimizer", {})
    params = optimizer.setdefault("params", {}) if optimizer else {}
    if (not optimizer.get("type", "").lower().startswith("adam") or "torch_adam" in params
            or "offload_optimizer" in ds.get("zero_optimization", {})):
        return ""
    if device.type != "cuda":
        params["torch_adam"] = True
        return "torch AdamW (DeepSpeed's fused Adam is a CUDA kernel)"
    available, why = fused_adam_available()
    if available:
        return f"DeepSpeed fused Adam ({why})"
    params.update(torch_adam=True, fused=True)
    return f"torch AdamW, fused (DeepSpeed's fused Adam: {why})"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups as DNABERT and GeneMask train: weight decay on the weight matrices and
    embeddings, none on biases and LayerNorm weights (a LayerNorm module's parameters, found by
    type rather than by name, so a renamed norm is not missed)."""
    norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
            for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or id(p) in norm else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def initialize(model: torch.nn.Module, ds: dict, source: Path, weight_decay: float):
    """deepspeed.initialize with param_groups; a config DeepSpeed refuses (its pydantic models,
    its asserts on optimizer and scheduler names) is an InputError naming `source`."""
    import deepspeed

    wd = ds.get("optimizer", {}).get("params", {}).get("weight_decay", weight_decay)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model,
                                               model_parameters=param_groups(model, wd),
                                               config=ds)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        raise InputError(f"{source}: DeepSpeed refused this config ({reason})") from None
    return engine
