"""The frozen teacher, and which of its parts it can take from the student instead of computing.

`Teacher` wraps a CLIP model that is frozen, always in eval mode (also after `.train()`), never
wrapped in DDP, and run under `torch.no_grad` (not `inference_mode`: its outputs are saved for
the student's backward by the distillation loss, which inference tensors cannot be).

Sharing: when the student's frozen trunk (or text tower) has exactly the teacher's weights and
structure and is fed the same input, the teacher's result for that part is the student's, so
the teacher runs only what differs (e.g. seed Part B: a convnext_base_w teacher and a locked
convnext_base_w_absattn student loaded from one checkpoint share the ConvNeXt trunk and the
whole text tower; the teacher then only runs its pooled linear head). `plan_sharing` decides it
from the weights (tensor equality), the module structure, a probe forward, the preprocessing
and whether the student's images are augmented; never from model names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .distill import Outputs, clear_capture
from .precision import autocast

PARTS = ("image_trunk", "text")
PREPROCESS_FIELDS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
_NOT_TEXT = ("logit_scale", "logit_bias")


def _unwrap(model: nn.Module) -> nn.Module:
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
        self.model = _unwrap(model)
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
        from .models import create_model, get_tokenizer

        if not pretrained:
            raise ValueError(
                f"teacher {name!r} needs its weights (--teacher-pretrained PATH): a random teacher teaches nothing")
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
        from .models import get_preprocess
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


def _is_stochastic(m: nn.Module) -> bool:
    """Modules whose train-mode output is random or batch-dependent."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    if type(m).__name__ == "DropPath":  # timm.layers.DropPath
        return getattr(m, "drop_prob", 0.0) > 0
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    return False


def _text_name(name: str) -> str:
    return name[len("text."):] if name.startswith("text.") else name


def _part_tensors(model: nn.Module, part: str) -> Dict[str, torch.Tensor]:
    if part == "image_trunk":
        trunk = model.visual.trunk
        return dict(trunk.named_parameters()) | dict(trunk.named_buffers())
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {_text_name(n): t for n, t in named if not n.startswith("visual.") and n not in _NOT_TEXT}


# timm's forward_head modules: pooling/norm/classifier after forward_features, which each side runs itself
_TIMM_HEAD_MODULES = ("head", "fc", "global_pool", "fc_norm", "head_drop", "attn_pool")


def _part_modules(model: nn.Module, part: str) -> List[Tuple[str, nn.Module]]:
    if part == "image_trunk":
        return [(n, m) for n, m in model.visual.trunk.named_modules() if n.split(".")[0] not in _TIMM_HEAD_MODULES]
    # CLIP keeps its text tower at the top level, CustomTextCLIP under `.text`: compare what is inside
    return [(_text_name(n), m) for n, m in model.named_modules()
            if n and n != "visual" and not n.startswith("visual.") and n != "text"]


def _structure(modules: List[Tuple[str, nn.Module]]) -> List[Tuple[str, str, str]]:
    # Dropout / DropPath at any rate are the identity in eval mode (timm builds nn.Identity at rate 0).
    def eval_identity(m: nn.Module) -> bool:
        return isinstance(m, (nn.modules.dropout._DropoutNd, nn.Identity)) or type(m).__name__ == "DropPath"

    return [(n, "Identity", "") if eval_identity(m) else (n, type(m).__name__, m.extra_repr()) for n, m in modules]


def _compare_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when equal, else the first difference in words."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return f"different tensors (e.g. {only[0]})"
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not torch.equal(x.detach(), y.detach().to(x.device)):
            return f"different weights ({k})"
    return None


def _norm_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_norm_value(x) for x in v)
    if isinstance(v, float):
        return round(v, 8)
    return v


def preprocess_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> Optional[str]:
    """None when two preprocess_cfgs give the same images, else the first differing field."""
    for f in PREPROCESS_FIELDS:
        va, vb = _norm_value(a.get(f)), _norm_value(b.get(f))
        if f == "size":
            va, vb = (va, va) if isinstance(va, int) else va, (vb, vb) if isinstance(vb, int) else vb
        if va != vb:
            return f"preprocessing differs: {f} {va} (student) vs {vb} (teacher)"
    return None


class _Modes:
    """Put modules in eval for a probe and restore each one's mode afterwards."""

    def __init__(self, modules: List[nn.Module]):
        self.modes = [(m, m.training) for m in modules]

    def __enter__(self) -> None:
        for m, _ in self.modes:
            m.training = False

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


def _probe(student: nn.Module, teacher: nn.Module, part: str) -> Optional[str]:
    """Run both parts on one fixed random input; None when the outputs agree."""
    device = next(student.parameters()).device
    gen = torch.Generator().manual_seed(0)
    modules = [m for _, m in _part_modules(student, part)]
    with torch.no_grad(), _Modes(modules):
        if part == "image_trunk":
            dtype = next(student.visual.trunk.parameters()).dtype
            h, w = student.visual.preprocess_cfg["size"] if not isinstance(
                student.visual.preprocess_cfg["size"], int) else (student.visual.preprocess_cfg["size"],) * 2
            x = torch.randn(1, 3, h, w, generator=gen).to(device, dtype)
            a = student.visual.trunk.forward_features(x)
            b = teacher.visual.trunk.forward_features(x.to(next(teacher.parameters()).device))
            clear_capture(student.visual.trunk)  # a probe, not a training forward
        else:
            ctx = int(getattr(student, "context_length", 77))
            vocab = min(int(getattr(student, "vocab_size", 49408)), int(getattr(teacher, "vocab_size", 49408)))
            tokens = torch.randint(1, vocab, (2, ctx), generator=gen).to(device)
            a = student.encode_text(tokens, normalize=True)
            b = teacher.encode_text(tokens.to(next(teacher.parameters()).device), normalize=True)
    a, b = a.float(), b.float().to(a.device)
    if a.shape != b.shape:
        return f"probe outputs differ in shape {tuple(a.shape)} vs {tuple(b.shape)}"
    tol = 1e-4 * max(1.0, float(a.abs().max()))
    if not torch.allclose(a, b, rtol=1e-4, atol=tol):
        return f"same weights but different probe outputs (max diff {float((a - b).abs().max()):.3g})"
    return None


@dataclass
class _Guard:
    params: List[nn.Parameter]
    stochastic: List[Tuple[str, nn.Module]]


@dataclass
class SharingPlan:
    """Which teacher parts ('image_trunk', 'text') are taken from the student, and why (not).

    `disable(part)` when the student unlocks that part (its weights will change). `active(part)`
    is what a forward asks: shared and still safe right now. It also switches a part off by
    itself, with a warning, if the student's part turned trainable without `disable`, and skips
    one forward (without disabling) while a stochastic student module of the part (dropout,
    drop-path, BatchNorm) is in train mode.
    """
    shared: Dict[str, bool]
    reasons: Dict[str, str]
    _guards: Dict[str, _Guard] = field(default_factory=dict, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    def is_shared(self, part: str) -> bool:
        self._check_part(part)
        return self.shared[part]

    def disable(self, part: str, why: str = "the student's copy is being trained") -> None:
        self._check_part(part)
        if self.shared[part]:
            self.shared[part] = False
            self.reasons[part] = f"disabled: {why}"

    def active(self, part: str) -> bool:
        if not self.is_shared(part):
            return False
        guard = self._guards.get(part)
        if guard is None:
            return True
        if any(p.requires_grad for p in guard.params):
            self.disable(part, "the student's parameters became trainable")
            logging.warning(f"teacher sharing of {part} switched off: the student's {part} is trainable now "
                            "(call SharingPlan.disable when unlocking it)")
            return False
        training = [n for n, m in guard.stochastic if m.training]
        if training:
            if part not in self._warned:
                self._warned.add(part)
                logging.warning(f"teacher computes its own {part}: student module {training[0] or part} is in train "
                                "mode (dropout/drop-path/BatchNorm), so its features are not the teacher's")
            return False
        return True

    def lines(self) -> List[str]:
        return [f"teacher {p}: {'shared with the student' if self.shared[p] else 'computed'} ({self.reasons[p]})"
                for p in PARTS]

    @staticmethod
    def _check_part(part: str) -> None:
        if part not in PARTS:
            raise ValueError(f"unknown shared part {part!r}; expected one of {PARTS}")


def _has_trunk(model: nn.Module) -> bool:
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    return trunk is not None and hasattr(trunk, "forward_features") and hasattr(trunk, "forward_head")


def plan_sharing(
        student: nn.Module,
        teacher: nn.Module,
        student_preprocess_is_augmented: bool,
        *,
        same_text_tokens: bool = True,
        teacher_gets_student_batch: bool = False,
        verify: bool = True,
) -> SharingPlan:
    """Decide per part whether the teacher may reuse the student's features.

    A part is shared when the student's copy is frozen, has the teacher's tensors (equal values,
    shapes, dtypes), the same module structure, gives the same output on a probe input
    (`verify`), and gets the same input:

    * 'image_trunk': by default the teacher sees its own un-augmented view (its eval transform,
      e.g. via TwoViews), so the preprocess_cfgs (size, mean, std, interpolation, resize mode,
      ...) must be equal and the student's images un-augmented. With
      `teacher_gets_student_batch=True` (upstream's behaviour: the teacher is fed the student's
      image tensor as is) the input is the same by construction and neither is required.
    * 'text': identical tokens (`same_text_tokens`, see distill.TokenizerPair.same).

    Call it after the student's freezing is applied.
    """
    student, teacher_model = _unwrap(student), _unwrap(teacher)
    shared: Dict[str, bool] = {}
    reasons: Dict[str, str] = {}
    guards: Dict[str, _Guard] = {}
    for part in PARTS:
        why = _why_not(student, teacher_model, part, student_preprocess_is_augmented, same_text_tokens,
                       teacher_gets_student_batch)
        if why is None and verify:
            why = _probe(student, teacher_model, part)
        shared[part] = why is None
        reasons[part] = why or "identical frozen weights and input"
        if why is None:
            params = [t for t in _part_tensors(student, part).values() if isinstance(t, nn.Parameter)]
            stochastic = [(n, m) for n, m in _part_modules(student, part) if _is_stochastic(m)]
            guards[part] = _Guard(params, stochastic)
    return SharingPlan(shared, reasons, guards)


def _why_not(student: nn.Module, teacher: nn.Module, part: str, augmented: bool,
             same_text_tokens: bool, teacher_gets_student_batch: bool) -> Optional[str]:
    if part == "image_trunk":
        if not (_has_trunk(student) and _has_trunk(teacher)):
            return "not a timm trunk on both sides"
        if not teacher_gets_student_batch:
            diff = preprocess_difference(student.visual.preprocess_cfg, teacher.visual.preprocess_cfg)
            if diff:
                return diff
            if augmented:
                return "student images are augmented; the teacher sees the un-augmented view"
    elif not same_text_tokens:
        return "different tokenizers"
    s_tensors = _part_tensors(student, part)
    if any(t.requires_grad for t in s_tensors.values()):
        return f"the student's {part} is trainable"
    diff = _compare_tensors(s_tensors, _part_tensors(teacher, part))
    if diff:
        return diff
    s_struct, t_struct = _structure(_part_modules(student, part)), _structure(_part_modules(teacher, part))
    if s_struct != t_struct:
        first = next((a, b) for a, b in zip(s_struct + [None] * len(t_struct), t_struct + [None] * len(s_struct))
                     if a != b)
        return f"different module structure at {first[0] or first[1]}"
    return None


class TwoViews:
    """Image transform giving (student view, teacher view) of one image, for a teacher that sees
    its own preprocessing (Teacher.preprocess()); the default collate stacks each view."""

    def __init__(self, student_transform: Callable, teacher_transform: Callable):
        self.student_transform, self.teacher_transform = student_transform, teacher_transform

    def __call__(self, image: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.student_transform(image), self.teacher_transform(image)


class TeacherRunner:
    """The teacher's forward for one (micro-)batch, taking shared parts from the student.

    `runner(images, texts, student_out, trunk_features)`: `images`/`texts` are the teacher's
    inputs (its own view/tokens, or the student's when they are the same); `student_out` the
    student's output dict and `trunk_features` its captured trunk features of this batch
    (TrunkCapture.pop()); either may be None, then that part is computed.
    """

    def __init__(self, teacher: Teacher, plan: Optional[SharingPlan] = None):
        self.teacher = teacher
        self.plan = plan
        self.shared_forwards = {p: 0 for p in PARTS}

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
        self.shared_forwards["image_trunk"] += use_trunk
        self.shared_forwards["text"] += use_text
        return self.teacher.encode(
            images=None if use_trunk else images,
            texts=None if use_text else texts,
            trunk_features=trunk_features if use_trunk else None,
            text_features=student_out["text_features"] if use_text else None,
        )
