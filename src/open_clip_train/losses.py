"""Training losses as named terms: `{"contrastive_loss": ...}`; the loop sums and logs each.

The contrastive terms come from open_clip's ClipLoss / SigLipLoss (with upstream's
`--local-loss` / `--gather-with-grad` semantics); later terms (distillation, head alignment)
are added to the same dict by their own modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from open_clip.loss import ClipLoss, SigLipLoss


@dataclass(frozen=True)
class LossCfg:
    local_loss: bool = False
    gather_with_grad: bool = False
    siglip: bool = False
    loss_dist_impl: str | None = None


class ContrastiveLoss(torch.nn.Module):
    def __init__(self, cfg: LossCfg, rank: int = 0, world_size: int = 1):
        super().__init__()
        if cfg.siglip:
            self.inner = SigLipLoss(rank=rank, world_size=world_size, dist_impl=cfg.loss_dist_impl)
        else:
            self.inner = ClipLoss(
                local_loss=cfg.local_loss,
                gather_with_grad=cfg.gather_with_grad,
                cache_labels=True,
                rank=rank,
                world_size=world_size,
            )

    def forward(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        kwargs = {"logit_bias": out["logit_bias"]} if out.get("logit_bias") is not None else {}
        loss = self.inner(out["image_features"], out["text_features"], out["logit_scale"], **kwargs)
        return {"contrastive_loss": loss}


def total(terms: Dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())


def merge_terms(*parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Named loss terms of several losses in one dict; a name produced twice is an error (one
    term would silently replace the other in the sum and the log)."""
    out: Dict[str, torch.Tensor] = {}
    for part in parts:
        clash = sorted(set(out) & set(part))
        if clash:
            raise ValueError(f"loss terms {clash} produced twice")
        out.update(part)
    return out
