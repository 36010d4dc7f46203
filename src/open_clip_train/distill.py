"""Distillation loss, the two token streams of a batch, and the plumbing both need.

* `DistillLoss`: CLIP contrastive loss of the student plus a temperature-scaled KL divergence
  from the teacher's image->text and text->image distributions to the student's (upstream's
  DistillClipLoss uses the teacher/student cross-entropy: the same gradient, offset by the
  teacher's entropy; here a student that matches the teacher scores exactly 0). Features in,
  named terms out, with open_clip ClipLoss's distributed semantics (local_loss,
  gather_with_grad); teacher features are gathered without autograd.
* `TokenizerPair`: student and teacher tokenizers (e.g. GPT-2 student, CLIP-BPE teacher) applied
  to the same captions, as a tuple or as one joint tensor that an unchanged dataset can carry.
* `merge_micro_batch` / `concat_outputs`: the gradient-cache accumulation (`--accum-freq`) inputs.
* `TrunkCapture`: the student's trunk features (timm `forward_features`) from its ordinary
  forward, for the teacher to reuse (teacher.py) and for head alignment (headalign.py).

Nothing here reads trainer arguments; `DistillCfg` is the typed config the CLI maps onto.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

Tokenizer = Callable[[Sequence[str]], torch.Tensor]
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
            raise ValueError("distillation needs a teacher model (--teacher-model)")
        if not self.teacher_cache and not self.teacher_pretrained:
            raise ValueError("a live teacher needs its weights (--teacher-pretrained), or pass --teacher-cache")
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

_PROBE_TEXTS = (
    "a photo of a dog.",
    "Two people riding bicycles down a busy street at night!",
    "",
    "an extremely long caption " + "that keeps going and going " * 12,
    "naïve café, 123 UPPER lower",
)


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a is b:
        return True
    try:
        ta, tb = a(list(_PROBE_TEXTS)), b(list(_PROBE_TEXTS))
    except Exception:  # a tokenizer that rejects the probe cannot be assumed equal
        return False
    return ta.shape == tb.shape and bool(torch.equal(ta, tb))


class TokenizerPair:
    """Tokenise captions for the student and the teacher.

    `pair(texts) -> (student_tokens, teacher_tokens)`; when both tokenizers give identical
    tokens (checked on probe captions) the teacher tokens are the student tensor itself and
    `same` is True (a precondition for sharing the text tower, see teacher.plan_sharing).

    For datasets that call `tokenizer([caption])[0]` per sample, `joint` returns one tensor
    [N, Ls + Lt] and `split` recovers the two streams after batching.
    """

    def __init__(self, student: Tokenizer, teacher: Optional[Tokenizer] = None):
        self.student = student
        self.teacher = teacher if teacher is not None else student
        self.same = _same_tokenizer(self.student, self.teacher)
        # fixed-length tokenizers: the split point of a joint tensor, known in every process
        self.student_len = int(self.student(["probe"]).shape[1])

    def __call__(self, texts: Sequence[str] | str) -> Tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        s = self.student(texts)
        return s, (s if self.same else self.teacher(texts))

    def joint(self, texts: Sequence[str] | str) -> torch.Tensor:
        s, t = self(texts)
        return s if self.same else torch.cat([s, t.to(s.dtype)], dim=1)

    def split(self, joint: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.same:
            return joint, joint
        return joint[:, :self.student_len], joint[:, self.student_len:]

    def collate(self, batch: Sequence[Tuple[torch.Tensor, str]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DataLoader collate_fn for (image, caption) samples -> (images, student_tokens, teacher_tokens)."""
        images = torch.stack([b[0] for b in batch])
        s, t = self([b[1] for b in batch])
        return images, s, t


# ---------------------------------------------------------------------------------------------
# trunk features from the student's own forward

_SLOT = "_trunk_capture_slot"


class _Slot:
    """Holds the last capture; a deepcopy of the model (EMA) gets an empty slot, never the
    captured tensor (a non-leaf tensor cannot be deep-copied)."""
    value: Optional[torch.Tensor] = None

    def __deepcopy__(self, memo) -> "_Slot":
        return _Slot()


def _capturing_forward_features(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = type(self).forward_features(self, x, *args, **kwargs)
    self.__dict__[_SLOT].value = out
    return out


def clear_capture(trunk: nn.Module) -> None:
    slot = trunk.__dict__.get(_SLOT)
    if slot is not None:
        slot.value = None


class TrunkCapture:
    """Keeps the output of `model.visual.trunk.forward_features` (the timm feature map, before the
    trunk's pooling/norm head) from every forward of the model, DDP-wrapped or not.

    Installed as a bound method in the trunk's instance dict, so a deepcopy of the model (an EMA
    copy) captures into its own copy. `pop()` returns the last capture and clears it (None when
    the trunk did not run since). The tensor keeps its autograd graph (consumers detach it):
    pop after every forward, also the ones whose features are not needed, to free it.
    """

    def __init__(self, model: nn.Module):
        model = getattr(model, "module", model)  # DDP wrapper -> the model
        visual = getattr(model, "visual", None)
        trunk = getattr(visual, "trunk", None)
        if trunk is None or not (hasattr(trunk, "forward_features") and hasattr(trunk, "forward_head")):
            raise ValueError(
                "trunk features need a timm image tower (model.visual.trunk with forward_features/forward_head), "
                f"got {type(visual).__name__}"
            )
        self.trunk = trunk
        trunk.__dict__.setdefault(_SLOT, _Slot())  # one slot per trunk, however many captures
        trunk.forward_features = types.MethodType(_capturing_forward_features, trunk)

    def pop(self) -> Optional[torch.Tensor]:
        slot = self.trunk.__dict__.get(_SLOT)
        if slot is None:  # closed
            return None
        value, slot.value = slot.value, None
        return value

    def close(self) -> None:
        self.trunk.__dict__.pop(_SLOT, None)
        self.trunk.__dict__.pop("forward_features", None)

    def __enter__(self) -> "TrunkCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stack_losses(terms: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Merge several named-term dicts (e.g. DistillLoss + HeadAlignLoss); names must not collide."""
    out: Dict[str, torch.Tensor] = {}
    for t in terms:
        clash = set(out) & set(t)
        if clash:
            raise ValueError(f"loss terms {sorted(clash)} produced twice")
        out.update(t)
    return out
