"""What `precision: auto` means, for pretraining and finetuning alike: bf16 on a GPU that has it,
else fp32. fp16 is never chosen for the user: without bf16 its range needs loss scaling, and a
run that overflows should be one the user asked for (precision: fp16).

Which explicit precisions a device accepts is the runtime's question (DeepSpeed's kernels for
pretraining, torch autocast for finetuning), answered where each runs.
"""
from __future__ import annotations


def auto_precision(device) -> str:
    """The precision `auto` resolves to on `device` (a torch.device)."""
    import torch
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def torch_dtype(precision: str):
    """The torch dtype of a resolved precision ("fp32", "bf16", "fp16")."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
