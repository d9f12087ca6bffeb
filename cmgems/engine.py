"""DeepSpeed config: a JSON from ds_configs/ whose "auto" values are filled from our config."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cmgems.config import PretrainConfig
from cmgems.errors import InputError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_ds_config(cfg: PretrainConfig, world_size: int, device: torch.device) -> dict:
    path = Path(cfg.ds_config) if cfg.ds_config else DS_CONFIG_DIR / f"zero{cfg.zero_stage}.json"
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read DeepSpeed config ({e})") from None
    precision = resolve_precision(cfg.precision, device)
    values = {
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "lr": cfg.lr, "warmup_max_lr": cfg.lr,
        "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps, "weight_decay": cfg.weight_decay,
        "warmup_num_steps": cfg.warmup_steps, "total_num_steps": cfg.max_steps,
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
    if device.type == "cpu" and ds.get("optimizer", {}).get("type", "").lower().startswith("adam") \
            and "offload_optimizer" not in zero:
        # fused_adam is a CUDA kernel; torch's AdamW is the CPU path.
        ds["optimizer"].setdefault("params", {})["torch_adam"] = True
    return ds
