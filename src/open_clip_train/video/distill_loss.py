"""TeachCLIP's objective (CVPR 2024) on plain tensors: ground truth + coarse + fine distillation.

Conventions (those of TeachCLIP's `train.py`): a similarity matrix is [B_text, B_video] logits
(row i: caption i against every video; the matched pairs on the diagonal); "t2v" softmaxes its
rows, "v2t" the rows of its transpose.

* ground truth: symmetric InfoNCE on the student's logits (open_clip ClipLoss on one process).
* coarse: each teacher's logits against the student's, both directions; `pear` (1 - Pearson
  correlation of the row-softmaxed rows, averaged over rows), `ce` (soft-target cross-entropy,
  averaged over all elements as TeachCLIP does), `l1` (smooth L1 on the logits). As in TeachCLIP
  the two directions are summed, and the loss is averaged over teachers.
* fine: for each matched pair, the teacher's sentence-to-frame relevance (a distribution over
  the video's frames) is the target of the student's AFA frame weights. Unlike the reference
  code, padded frames are excluded on both sides: the student's weights are a softmax of its AFA
  scores over the valid frames only, and the terms sum over valid frames only.

Under DDP the trainer passes the gathered (global) matrices, as TeachCLIP all-gathers before
its losses; nothing here talks to torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("pear", "ce", "l1")
TERMS = ("contrastive_loss", "distill_coarse_loss", "distill_fine_loss")
# TeachCLIP's totals: `ce` -> 1 x gt + 10 x coarse + 1 x fine; otherwise 0.2 x gt + 1 x coarse + 2 x fine
_DEFAULT_WEIGHTS = {"ce": (1.0, 10.0, 1.0), "pear": (0.2, 1.0, 2.0), "l1": (0.2, 1.0, 2.0)}


def _check_method(method: str, what: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{what} distillation method must be one of {METHODS}, got {method!r}")


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on square [B, B] logits, matched pairs on the diagonal."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _centred_pearson_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - correlation of each row of already centred p and q. A constant row (zero norm) has
    no correlation: its loss is 1 with a finite gradient instead of 0/0."""
    denom = (p.norm(dim=-1) * q.norm(dim=-1)).clamp_min(1e-20)
    return 1 - (p * q).sum(-1) / denom


def _row_pearson_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 - Pearson correlation of each row of p with the same row of q, per row."""
    return _centred_pearson_loss(p - p.mean(-1, keepdim=True), q - q.mean(-1, keepdim=True))


def coarse_loss(student: torch.Tensor, teacher: torch.Tensor, method: str = "pear") -> torch.Tensor:
    """One teacher's coarse-grained distillation loss; both [B_text, B_video] logits."""
    _check_method(method, "coarse")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher similarity {tuple(teacher.shape)} != student's {tuple(student.shape)}")
    teacher = teacher.detach().to(student.dtype)
    if method == "l1":
        return F.smooth_l1_loss(student, teacher)
    total = student.new_zeros(())
    for s, t in ((student, teacher), (student.T, teacher.T)):  # t2v, v2t
        if method == "pear":
            total = total + _row_pearson_loss(s.softmax(-1), t.softmax(-1)).mean()
        else:
            total = total + (-t.softmax(-1) * s.log_softmax(-1)).mean()
    return total


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the entries where mask is True; masked entries get exactly 0."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim).masked_fill(~mask, 0.0)


def fine_loss(student_weights: torch.Tensor, teacher_relevance: torch.Tensor, mask: torch.Tensor,
              method: str = "ce") -> torch.Tensor:
    """One teacher's fine-grained loss on matched pairs; all [B, T], distributions over the valid
    frames (`mask` True). `ce` and `l1` average over the valid (video, frame) entries (with no
    padding: TeachCLIP's mean over all entries); `pear` averages the per-video 1 - Pearson over
    the videos with at least two valid frames (one frame has no distribution to match)."""
    _check_method(method, "fine")
    if not (student_weights.shape == teacher_relevance.shape == mask.shape):
        raise ValueError(f"fine loss: student {tuple(student_weights.shape)}, teacher "
                         f"{tuple(teacher_relevance.shape)} and mask {tuple(mask.shape)} must be the same [B, T]")
    mask = mask.bool()
    q = teacher_relevance.detach().to(student_weights.dtype)
    if method == "ce":
        # log of masked entries is -inf; select before multiplying so they add nothing
        logp = student_weights.clamp_min(torch.finfo(student_weights.dtype).tiny).log()
        return -(q * logp)[mask].sum() / mask.sum().clamp_min(1)
    if method == "l1":
        return F.smooth_l1_loss(student_weights[mask], q[mask])
    n = mask.sum(-1, keepdim=True).clamp_min(1)
    p_c = (student_weights - (student_weights * mask).sum(-1, keepdim=True) / n) * mask
    q_c = (q - (q * mask).sum(-1, keepdim=True) / n) * mask
    rows = mask.sum(-1) >= 2
    return _centred_pearson_loss(p_c, q_c)[rows].sum() / rows.sum().clamp_min(1)


@dataclass
class VideoDistillCfg:
    """Methods and weights; a weight left None takes TeachCLIP's value for the coarse method."""
    coarse: str = "pear"
    fine: str = "ce"
    gt_weight: Optional[float] = None
    coarse_weight: Optional[float] = None
    fine_weight: Optional[float] = None

    def __post_init__(self) -> None:
        _check_method(self.coarse, "coarse")
        _check_method(self.fine, "fine")
        defaults = _DEFAULT_WEIGHTS[self.coarse]
        for name, default in zip(("gt_weight", "coarse_weight", "fine_weight"), defaults):
            value = getattr(self, name)
            value = default if value is None else float(value)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)


class VideoDistillLoss(nn.Module):
    """`loss(student_logits, frame_scores, frame_mask, teacher_logits, teacher_relevance)` ->
    {"contrastive_loss", "distill_coarse_loss", "distill_fine_loss"}, each already weighted
    (their sum is the objective).

    student_logits [B, B] (text x video, student's logit scale applied); frame_scores [B, T]: the
    student's AFA frame scores before any softmax (its pooling uses softmax(scores / 0.1), the
    fine target is matched against softmax(scores), as TeachCLIP); frame_mask [B, T] bool, True =
    real frame; teacher_logits / teacher_relevance: one [B, B] / [B, T] per teacher (e.g.
    VideoTeacher.similarity / .relevance). With no teacher only the ground truth term is
    returned.
    """

    def __init__(self, cfg: Optional[VideoDistillCfg] = None):
        super().__init__()
        self.cfg = cfg or VideoDistillCfg()

    def forward(self, student_logits: torch.Tensor, frame_scores: Optional[torch.Tensor],
                frame_mask: Optional[torch.Tensor], teacher_logits: Sequence[torch.Tensor] = (),
                teacher_relevance: Sequence[torch.Tensor] = ()) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        out = {"contrastive_loss": cfg.gt_weight * contrastive_loss(student_logits)}
        if teacher_logits:
            coarse = sum(coarse_loss(student_logits, t, cfg.coarse) for t in teacher_logits)
            out["distill_coarse_loss"] = cfg.coarse_weight * coarse / len(teacher_logits)
        if teacher_relevance:
            if frame_scores is None or frame_mask is None:
                raise ValueError("fine distillation needs the student's frame scores and the frame mask")
            weights = masked_softmax(frame_scores, frame_mask.bool())
            fine = sum(fine_loss(weights, r, frame_mask, cfg.fine) for r in teacher_relevance)
            out["distill_fine_loss"] = cfg.fine_weight * fine / len(teacher_relevance)
        return out
