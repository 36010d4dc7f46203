"""The student's trunk features (timm `forward_features`) captured from its ordinary forward,
for the teacher to reuse (teacher.py) and for head alignment (headalign.py)."""
from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn


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
