"""`--precision` semantics, as upstream: amp* = autocast over fp32 weights, pure_* / fp16 / bf16 =
weights cast to that dtype, fp32 = nothing."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch


def autocast(precision: str, device: torch.device):
    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        # fp16 on CUDA; CPU autocast only supports bfloat16 (upstream gets the same by default)
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
    return nullcontext()


def input_dtype(precision: str) -> Optional[torch.dtype]:
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    return None


def grad_scaler(precision: str, device: torch.device):
    """Loss scaling is only needed for fp16 autocast on CUDA."""
    if precision == "amp" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
