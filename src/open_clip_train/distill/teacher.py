"""The frozen teacher (`Teacher`) and its forward per batch (`TeacherRunner`), which takes the
parts a `SharingPlan` (sharing.py) allows from the student instead of computing them.

`Teacher` wraps a CLIP model that is frozen, always in eval mode (also after `.train()`), never
wrapped in DDP, and run under `torch.no_grad` (not `inference_mode`: its outputs are saved for
the student's backward by the distillation loss, which inference tensors cannot be).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import flag
from .losses import Outputs

if TYPE_CHECKING:
    from .sharing import SharingPlan
from ..precision import autocast

PARTS = ("image_trunk", "text")


def unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, Teacher):
        return model.model
    return getattr(model, "module", model)  # DDP


class Teacher(nn.Module):
    """A frozen CLIP model: `encode(images, texts) -> {image_features, text_features, logit_scale}`
    (normalised features, exp'd scale), under the teacher's own precision (autocast for amp*,
    cast weights for fp16/bf16/pure_*).

    Either part can be handed in instead of computed: `trunk_features` (the output of the
    student's trunk `forward_features`, see distill.TrunkCapture) replaces running the teacher's
    own trunk body, `text_features` replaces its text tower; only do so as a SharingPlan allows.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", *, name: str = "",
                 weights_path: Optional[str] = None, tokenizer: Optional[Callable] = None):
        super().__init__()
        self.model = unwrap(model)
        self.model.requires_grad_(False)
        self.precision = precision
        self.name = name
        self.weights_path = weights_path
        self.tokenizer = tokenizer
        self.eval()

    @classmethod
    def from_pretrained(
            cls,
            name: str,
            pretrained: str,
            *,
            device: str | torch.device = "cpu",
            precision: str = "fp32",
            text_tokenizer: Optional[str] = None,
            trust_checkpoint: bool = False,
    ) -> "Teacher":
        """Build `name` and load `pretrained` (a local file); every teacher weight must load."""
        from ..models import create_model, get_tokenizer

        if not pretrained:
            raise ValueError(
                f"teacher {name!r} needs its weights ({flag('teacher_pretrained')} PATH): a random teacher teaches nothing")
        model, report = create_model(name, pretrained=pretrained, precision=precision, device=device,
                                     trust_checkpoint=trust_checkpoint)
        if report.missing or report.mismatched:
            lines = report.summary_lines()
            raise ValueError(
                f"teacher weights {pretrained} do not fit model {name!r}: {'; '.join(lines[:4])}"
                + (f" (+{len(lines) - 4} more)" if len(lines) > 4 else "")
            )
        tokenizer = get_tokenizer(name, text_tokenizer)
        return cls(model, precision, name=name, weights_path=str(pretrained), tokenizer=tokenizer)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never trains: no dropout, drop-path, BN updates

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def preprocess_cfg(self) -> Dict[str, Any]:
        return dict(self.model.visual.preprocess_cfg)

    def preprocess(self) -> Callable:
        """The teacher's un-augmented image transform (what a teacher view / the cache uses)."""
        from ..models import get_preprocess
        return get_preprocess(self.model, is_train=False)

    # ------------------------------------------------------------------ forward
    def _guard(self) -> None:
        if self.model.training:  # someone called .train() on the inner model directly
            self.model.eval()

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        return images.to(self.device, dtype=dtype if images.is_floating_point() else None, non_blocking=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self._guard()
        with torch.no_grad(), autocast(self.precision, self.device):
            return self.model.encode_image(self._images(images), normalize=True)

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        self._guard()
        with torch.no_grad(), autocast(self.precision, self.device):
            return self.model.encode_text(texts.to(self.device, non_blocking=True), normalize=True)

    def image_from_trunk(self, trunk_features: torch.Tensor) -> torch.Tensor:
        """What the teacher's image tower computes after its trunk body: timm forward_head
        (pool/norm as configured) then the open_clip head; normalised."""
        self._guard()
        visual = self.model.visual
        with torch.no_grad(), autocast(self.precision, self.device):
            x = trunk_features.detach().to(self.device, dtype=self.dtype)
            x = visual.head(visual.trunk.forward_head(x))
            return F.normalize(x, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    def encode(
            self,
            images: Optional[torch.Tensor] = None,
            texts: Optional[torch.Tensor] = None,
            *,
            trunk_features: Optional[torch.Tensor] = None,
            text_features: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        if trunk_features is not None:
            image_features = self.image_from_trunk(trunk_features)
        elif images is not None:
            image_features = self.encode_image(images)
        else:
            raise ValueError("teacher.encode needs images or trunk_features")
        if text_features is not None:
            text_out = text_features.detach()
        elif texts is not None:
            text_out = self.encode_text(texts)
        else:
            raise ValueError("teacher.encode needs texts or text_features")
        return {"image_features": image_features, "text_features": text_out, "logit_scale": self.logit_scale()}


# ---------------------------------------------------------------------------------------------
# sharing plan


class TeacherRunner:
    """The teacher's forward for one (micro-)batch, taking shared parts from the student.

    `runner(images, texts, student_out, trunk_features)`: `images`/`texts` are the teacher's
    inputs (its own view/tokens, or the student's when they are the same); `student_out` the
    student's output dict and `trunk_features` its captured trunk features of this batch
    (TrunkCapture.pop()); either may be None, then that part is computed.
    """

    reads_student = True  # may reuse the student's outputs: called after its forward

    def __init__(self, teacher: Teacher, plan: Optional[SharingPlan] = None):
        self.teacher = teacher
        self.plan = plan

    def __call__(
            self,
            images: Optional[torch.Tensor],
            texts: Optional[torch.Tensor],
            student_out: Optional[Outputs] = None,
            trunk_features: Optional[torch.Tensor] = None,
            *,
            ids: Optional[torch.Tensor] = None,  # sample ids: only a cached teacher needs them
    ) -> Dict[str, torch.Tensor]:
        plan = self.plan
        use_trunk = plan is not None and trunk_features is not None and plan.active("image_trunk")
        use_text = plan is not None and student_out is not None and plan.active("text")
        return self.teacher.encode(
            images=None if use_trunk else images,
            texts=None if use_text else texts,
            trunk_features=trunk_features if use_trunk else None,
            text_features=student_out["text_features"] if use_text else None,
        )
