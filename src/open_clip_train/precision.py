"""`--precision` semantics, as upstream: amp* = autocast over fp32 weights, pure_* / fp16 / bf16 =
weights cast to that dtype, fp32 = nothing."""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

# The one list of names (the flag parser imports it, so torch is only imported where it is used).
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


def autocast(precision: str, device: torch.device):
    import torch

    if precision in ("amp_bf16", "amp_bfloat16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":
        # fp16 on CUDA; CPU autocast only supports bfloat16 (upstream gets the same by default)
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
    return nullcontext()


def input_dtype(precision: str) -> Optional[torch.dtype]:
    import torch

    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    return None


def grad_scaler(precision: str, device: torch.device):
    """Loss scaling is only needed for fp16 autocast on CUDA."""
    if precision == "amp" and device.type == "cuda":
        import torch

        return torch.amp.GradScaler("cuda")
    return None
