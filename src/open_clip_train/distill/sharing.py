"""Which parts of the teacher it can take from the student instead of computing (`plan_sharing`).

When the student's frozen trunk (or text tower) has exactly the teacher's weights and structure
and is fed the same input, the teacher's result for that part is the student's, so the teacher
runs only what differs (e.g. seed Part B: a convnext_base_w teacher and a locked
convnext_base_w_absattn student loaded from one checkpoint share the ConvNeXt trunk and the
whole text tower; the teacher then only runs its pooled linear head). Decided from the weights
(tensor equality), the module structure, a probe forward, the preprocessing and whether the
student's images are augmented; never from model names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .capture import clear_capture
from .teacher import PARTS, unwrap

if TYPE_CHECKING:
    from .teacher import Teacher

# What decides the image a tower sees: compared for sharing, recorded in teacher-cache manifests.
PREPROCESS_FIELDS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
_NOT_TEXT = ("logit_scale", "logit_bias")


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
    student, teacher_model = unwrap(student), unwrap(teacher)
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
