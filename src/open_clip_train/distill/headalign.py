"""Head alignment: keep a new image head close to the checkpoint's frozen head on the same trunk.

Seed Part B replaces convnext_base_w's linear head (trunk global pool -> norm -> Dropout ->
Linear, open_clip TimmModel with timm_pool '' / timm_proj 'linear') by an attention pool. The
checkpoint's head no longer fits the student, so `build_reference_head` rebuilds it beside the
student, frozen, from the checkpoint tensors. Per step it runs on the trunk features the
student already computed (distill.TrunkCapture): one small head forward, no teacher.

* mode 'cosine': mean of 1 - cos(new head embedding, reference embedding).
* mode 'kl': KL from the reference head's image-text distributions to the new head's (both
  directions, like distillation), against the student's text features of the batch (its frozen
  text tower), at the student's logit scale. Text features and scale are detached: the term
  moves the image head only. Computed over the local batch.

The reference output is detached, so alignment never moves the trunk through the reference.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import flag
from .losses import Outputs, kl_rows

HEADALIGN_MODES = ("cosine", "kl")
_HEAD = "visual.head."
_TRUNK_HEAD = "visual.trunk.head."


@dataclass(frozen=True)
class HeadAlignCfg:
    """What `--headalign --headalign-weight W --headalign-mode M` map onto."""
    weight: float = 1.0
    mode: str = "cosine"
    pool: str = "avg"  # the checkpoint trunk's global pool (open_clip timm_pool '' keeps timm's default)

    def __post_init__(self) -> None:
        if self.mode not in HEADALIGN_MODES:
            raise ValueError(f"headalign mode must be one of {HEADALIGN_MODES}, got {self.mode!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"headalign weight must be a finite number >= 0, got {self.weight}")


class ReferenceHead(nn.Module):
    """Frozen pretrained head: trunk-head pooling/norm (as timm's forward_head) -> Dropout ->
    Linear, on the trunk's forward_features output; returns normalised embeddings, no grad.
    Keep it outside the student model (not in its state_dict, optimizer or DDP)."""

    def __init__(self, pool: nn.Module, proj: nn.Linear, drop: float = 0.0):
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(drop)
        self.proj = proj
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ReferenceHead":
        return super().train(False)

    def forward(self, trunk_features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = trunk_features.detach().to(self.proj.weight.device)
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(self.proj.weight.dtype)
            x = self.proj(self.drop(self.pool(x)))
            return F.normalize(x, dim=-1)


def read_head_state(path: str | Path, trust: bool = False) -> Dict[str, torch.Tensor]:
    """Only the image-head tensors (visual.head.*, visual.trunk.head.*) of a checkpoint file,
    read lazily (safetensors / mmap) where the format allows."""
    path = str(path)
    keep = (_HEAD, _TRUNK_HEAD)

    def wanted(k: str) -> bool:
        return k.removeprefix("module.").removeprefix("_orig_mod.").startswith(keep)

    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    else:
        from ..models.weights import load_torch_file

        state = load_torch_file(path, trust, mmap=True)  # weights-only unless trusted
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        state = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and wanted(k)}
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def build_reference_head(
        student: nn.Module, state_dict: Mapping[str, torch.Tensor], *, pool: str = "avg", drop: float = 0.0,
) -> ReferenceHead:
    """The checkpoint's linear image head, frozen, on the student's trunk (dtype/device of the trunk).

    `state_dict`: full model keys (read_head_state(path) or weights.read_state_dict(path)). Raises
    ValueError (one line) when there is nothing to align to: no image head in the checkpoint, a
    checkpoint head that fits (and so was loaded into) the student's own head, an unsupported
    head kind, or a trunk whose pooled width does not match the projection.
    """
    student = getattr(student, "module", student)
    trunk = getattr(getattr(student, "visual", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "forward_features"):
        raise ValueError(f"{flag('headalign')} needs a timm image tower (model.visual.trunk); this model has none")
    ck_head = {k[len(_HEAD):]: v for k, v in state_dict.items() if k.startswith(_HEAD)}
    if not ck_head:
        raise ValueError(f"{flag('headalign')}: the checkpoint has no image head (visual.head.*) to align the new head to")
    own = student.visual.head.state_dict()
    if all(k in own and own[k].shape == v.shape for k, v in ck_head.items()):
        raise ValueError(
            f"{flag('headalign')}: the checkpoint's head (visual.head.{sorted(ck_head)[0]}) fits the student's head and "
            "was loaded into it; there is no separate pretrained head to align to"
        )
    if set(ck_head) not in ({"proj.weight"}, {"proj.weight", "proj.bias"}):
        raise ValueError(
            f"{flag('headalign')}: unsupported checkpoint head {sorted('visual.head.' + k for k in ck_head)}; "
            "only a linear projection (visual.head.proj) can serve as the reference"
        )
    trunk_head = getattr(trunk, "head", None)
    if trunk_head is None or not hasattr(trunk_head, "reset"):
        raise ValueError(
            f"{flag('headalign')}: trunk {type(trunk).__name__} has no timm pooling head (trunk.head.reset); "
            "the pretrained head's pooling cannot be rebuilt"
        )
    param = next(trunk.parameters())
    pooled = copy.deepcopy(trunk_head)
    pooled.reset(0, pool_type=pool)  # the checkpoint model's trunk pooled; the student's does not
    ck_trunk_head = {k[len(_TRUNK_HEAD):]: v for k, v in state_dict.items() if k.startswith(_TRUNK_HEAD)}
    target = pooled.state_dict()
    fits = {k: v for k, v in ck_trunk_head.items() if k in target and target[k].shape == v.shape}
    pooled.load_state_dict(fits, strict=False)  # the rest (if any) as the student's trunk has it

    weight = ck_head["proj.weight"]
    width = getattr(trunk, "num_features", None)
    if width is not None and weight.shape[1] != width:
        raise ValueError(
            f"{flag('headalign')}: checkpoint head visual.head.proj.weight {list(weight.shape)} takes {weight.shape[1]} "
            f"features but the trunk pools {width}"
        )
    proj = nn.Linear(weight.shape[1], weight.shape[0], bias="proj.bias" in ck_head)
    with torch.no_grad():
        proj.weight.copy_(weight)
        if proj.bias is not None:
            proj.bias.copy_(ck_head["proj.bias"])
    return ReferenceHead(pooled, proj, drop).to(device=param.device, dtype=param.dtype)


class HeadAlignLoss(nn.Module):
    """`{"headalign_loss": weight x alignment}` from the student's output dict and the reference
    head's embeddings of the same rows (ReferenceHead(trunk_features)).

    For gradient-cache accumulation, pass the accumulated student dict (distill.merge_micro_batch)
    and the reference embeddings of all micro-batches concatenated (computed once, no grad)."""

    def __init__(self, weight: float = 1.0, mode: str = "cosine"):
        super().__init__()
        if mode not in HEADALIGN_MODES:
            raise ValueError(f"headalign mode must be one of {HEADALIGN_MODES}, got {mode!r}")
        self.weight = float(weight)
        self.mode = mode

    def forward(self, student: Outputs, reference_features: torch.Tensor) -> Dict[str, torch.Tensor]:
        new = F.normalize(student["image_features"].float(), dim=-1)
        ref = F.normalize(reference_features.detach().float(), dim=-1)
        if new.shape != ref.shape:
            raise ValueError(f"student image features {tuple(new.shape)} vs reference {tuple(ref.shape)}: "
                             "the reference head must embed the same rows into the same space")
        if self.mode == "cosine":
            value = (1 - (new * ref).sum(dim=-1)).mean()
        else:
            text = F.normalize(student["text_features"].detach().float(), dim=-1)
            scale = torch.as_tensor(student["logit_scale"]).detach().float()
            new_logits, ref_logits = scale * new @ text.T, scale * ref @ text.T
            value = (kl_rows(ref_logits, new_logits) + kl_rows(ref_logits.T, new_logits.T)) / 2
        return {"headalign_loss": self.weight * value}
