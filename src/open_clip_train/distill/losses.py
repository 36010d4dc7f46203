"""The distillation loss and the gradient-cache accumulation inputs.

* `DistillLoss`: CLIP contrastive loss of the student plus a temperature-scaled KL divergence
  from the teacher's image->text and text->image distributions to the student's (upstream's
  DistillClipLoss uses the teacher/student cross-entropy: the same gradient, offset by the
  teacher's entropy; here a student that matches the teacher scores exactly 0). Features in,
  named terms out, with open_clip ClipLoss's distributed semantics (local_loss,
  gather_with_grad); teacher features are gathered without autograd.
* `merge_micro_batch` / `concat_outputs`: the gradient-cache accumulation (`--accum-freq`) inputs.

Nothing here reads trainer arguments; `DistillCfg` is the typed config the CLI maps onto.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from ..errors import flag

Outputs = Mapping[str, torch.Tensor]
FEATURE_KEYS = ("image_features", "text_features")


@dataclass(frozen=True)
class DistillCfg:
    """What `--distill*` / `--teacher-*` map onto; `teacher_cache` replaces the live teacher."""
    teacher_model: str = ""
    teacher_pretrained: Optional[str] = None
    weight: float = 1.0
    temperature: float = 1.0
    teacher_cache: Optional[str] = None  # a directory written by extract_teacher: no teacher is built
    teacher_text_tokenizer: Optional[str] = None  # HF tokenizer dir, only for a GPT-2 teacher
    share: bool = True  # let a live teacher reuse the student's identical frozen parts (teacher.plan_sharing)

    def __post_init__(self) -> None:
        if not self.teacher_model:
            raise ValueError(f"distillation needs a teacher model ({flag('teacher_model')})")
        if not self.teacher_cache and not self.teacher_pretrained:
            raise ValueError(f"a live teacher needs its weights ({flag('teacher_pretrained')}), or pass {flag('teacher_cache')}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"distill weight must be a finite number >= 0, got {self.weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")


# ---------------------------------------------------------------------------------------------
# loss


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean over rows of KL(softmax(t/T) || softmax(s/T)), times T^2 (Hinton's gradient scale)."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    log_p = t.log_softmax(dim=1)
    kl = (log_p.exp() * (log_p - s.log_softmax(dim=1))).sum(dim=1)
    return kl.mean() * temperature ** 2


def _gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' rows in rank order; no autograd (teacher features carry none)."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class DistillLoss(nn.Module):
    """Student contrastive loss + `weight` x distillation KL; returns
    `{"contrastive_loss": .., "distill_loss": ..}` (distill_loss already weighted).

    `student` holds the model's output dict (normalised `image_features`, `text_features`,
    exp'd `logit_scale`, optional `logit_bias`); `teacher` the same keys from `Teacher.encode`,
    a `TeacherCache`, or `concat_outputs` (the teacher's logit_bias, a constant shift of every
    logit, cannot change its softmax and is ignored).

    Distributed (rank, world_size > 1), as open_clip's ClipLoss: without local_loss every rank
    builds the global [N, N] logits; with local_loss its local rows against all gathered columns.
    The teacher's logits are laid out the same way from its gathered features.
    """

    def __init__(
            self,
            weight: float = 1.0,
            temperature: float = 1.0,
            *,
            local_loss: bool = False,
            gather_with_grad: bool = False,
            rank: int = 0,
            world_size: int = 1,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {temperature}")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.local_loss = local_loss
        self.world_size = world_size
        self.clip = ClipLoss(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
            rank=rank, world_size=world_size,
        )

    def teacher_logits(self, teacher: Outputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher (logits_per_image, logits_per_text) in the student's layout, without autograd."""
        with torch.no_grad():
            img = teacher["image_features"].detach()
            txt = teacher["text_features"].detach()
            scale = torch.as_tensor(teacher["logit_scale"], device=img.device).detach().float()
            img, txt = img.float(), txt.float()
            if self.world_size > 1:
                all_img = _gather_no_grad(img, self.world_size)
                all_txt = _gather_no_grad(txt, self.world_size)
                if self.local_loss:
                    return scale * img @ all_txt.T, scale * txt @ all_img.T
                per_image = scale * all_img @ all_txt.T
                return per_image, per_image.T
            return scale * img @ txt.T, scale * txt @ img.T

    def forward(self, student: Outputs, teacher: Outputs) -> Dict[str, torch.Tensor]:
        img, txt = student["image_features"], student["text_features"]
        t_img = teacher["image_features"]
        if t_img.shape[0] != img.shape[0] or teacher["text_features"].shape[0] != txt.shape[0]:
            raise ValueError(
                f"teacher has {t_img.shape[0]} images / {teacher['text_features'].shape[0]} texts but the student "
                f"{img.shape[0]} / {txt.shape[0]}: they must be the same batch"
            )
        per_image, per_text = self.clip.get_logits(img, txt, student["logit_scale"], student.get("logit_bias"))
        labels = self.clip.get_ground_truth(img.device, per_image.shape[0])
        contrastive = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        t_per_image, t_per_text = self.teacher_logits(teacher)
        distill = (kl_rows(t_per_image, per_image, self.temperature)
                   + kl_rows(t_per_text, per_text, self.temperature)) / 2
        return {"contrastive_loss": contrastive, "distill_loss": self.weight * distill}


# ---------------------------------------------------------------------------------------------
# gradient-cache accumulation


def merge_micro_batch(
        cached: Sequence[Outputs], j: int, live: Outputs, keys: Sequence[str] = FEATURE_KEYS,
) -> Dict[str, torch.Tensor]:
    """The accumulated batch for micro-batch j's backward: `keys` concatenated over micro-batches
    with row block j taken from `live` (the forward with grad), every other key from `live`."""
    merged = dict(live)
    for k in keys:
        merged[k] = torch.cat([c[k] for c in cached[:j]] + [live[k]] + [c[k] for c in cached[j + 1:]])
    return merged


def concat_outputs(parts: Sequence[Outputs], keys: Sequence[str] = FEATURE_KEYS) -> Dict[str, torch.Tensor]:
    """Per-micro-batch outputs (e.g. teacher features cached in the no-grad pass) as one batch;
    non-feature keys (logit_scale) from the first part."""
    if not parts:
        raise ValueError("no micro-batch outputs to concatenate")
    out = dict(parts[0])
    for k in keys:
        out[k] = torch.cat([p[k] for p in parts])
    return out


# ---------------------------------------------------------------------------------------------
# tokenizers
