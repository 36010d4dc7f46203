"""When a fully frozen image trunk runs compiled: `--compile-frozen auto|on|off` (default auto).

A locked trunk is a pure function of its input, so `torch.compile` of its forward (without
autograd, `compile_frozen_trunk`) is safe; it fuses the elementwise work (GELU, GRN,
LayerNorm, residual adds) that is about half of a ConvNeXt forward, and ran 1.85x faster on the
frozen ConvNeXtV2-Tiny forward on CPU. But compiling costs tens of seconds to minutes once per
process, which a tiny model or a short frozen phase never earns back.

`auto` therefore measures: it times the eager trunk forward on the first steps of a frozen
phase, estimates what compiling would save over the steps left in that phase, and compiles only
when that clearly exceeds the compile cost. Rank 0 decides for every rank, so all ranks run the
same code. `on` compiles at every frozen phase start; `off` never compiles.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from . import distributed as dist_env

MODES = ("auto", "on", "off")
EXPECTED_SAVING = 0.4  # fraction of the eager forward that compiling saves (measured: ~0.46 on CPU)
COMPILE_BUDGET_S = 300.0  # compiling must be expected to save more than this (compile cost + margin)
TIMED_STEPS = 3  # steps timed per decision; the first is left out (one-off set-up costs)


def expected_saving(trunk_s_per_step: float, steps_left: int) -> float:
    return EXPECTED_SAVING * trunk_s_per_step * steps_left


def worth_compiling(trunk_s_per_step: float, steps_left: int) -> bool:
    """Expected saving over the rest of the frozen phase against the compile budget."""
    return expected_saving(trunk_s_per_step, steps_left) > COMPILE_BUDGET_S


class _ForwardTimer:
    """Wall time of the trunk's forward calls (device-synchronised on CUDA), via module hooks."""

    def __init__(self, trunk: nn.Module, device: torch.device):
        self.pending = 0.0  # forward seconds since the last step boundary
        self.per_step: List[float] = []  # every forward of a step (accumulation runs several)
        self._t0 = 0.0
        self._sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._handles = [trunk.register_forward_pre_hook(self._pre), trunk.register_forward_hook(self._post)]

    def _pre(self, module, args) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self._sync()
        self.pending += time.perf_counter() - self._t0

    def end_step(self) -> None:
        self.per_step.append(self.pending)
        self.pending = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class FrozenTrunkCompiler:
    """Applies the compile mode at every change of the trainable set (`on_phase`) and, in auto
    mode, decides after the first steps of a frozen phase (`after_step`)."""

    def __init__(self, mode: str, device: torch.device, allowed: bool = True):
        if mode not in MODES:
            raise ValueError(f"compile_frozen must be one of {MODES}, got {mode!r}")
        self.mode = mode if allowed else "off"
        self.device = device
        self._timer: Optional[_ForwardTimer] = None
        self._phase_end = 0  # global step at which the current frozen phase ends
        self._compile_pending = False  # compiled, but the compile runs at the next forward

    @property
    def settled(self) -> bool:
        """No timing under way and no compile waiting for its first step: steps look alike from here."""
        return self._timer is None and not self._compile_pending

    def on_phase(self, model: nn.Module, step: int, phase_end_step: int) -> None:
        """The trainable set changed (start, unlock, resume): compile, time, or go eager."""
        self._stop_timing()
        self._phase_end = phase_end_step
        trunk = getattr(getattr(model, "visual", None), "trunk", None)
        frozen = trunk is not None and not any(p.requires_grad for p in trunk.parameters())
        if self.mode == "on" and frozen:
            if self._compile(model):
                logging.info("image trunk fully frozen: running it compiled, without autograd (--compile-frozen on)")
            return
        compile_frozen_trunk(model, False)  # eager from here (a no-op unless it was compiled)
        if self.mode == "auto" and frozen and phase_end_step > step:
            self._timer = _ForwardTimer(trunk, self.device)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Auto mode: once the frozen forward has been timed, compile if it pays off."""
        timer = self._timer
        self._compile_pending = False  # a step ran since any compile was switched on
        if timer is None:
            return
        timer.end_step()
        if len(timer.per_step) < TIMED_STEPS:
            return
        self._stop_timing()
        per_step = statistics.median(timer.per_step[1:])
        steps_left = max(self._phase_end - step, 0)
        decision = dist_env.broadcast_object(worth_compiling(per_step, steps_left))
        what = (f"{per_step:.3f} s of eager trunk forward per step x {steps_left} frozen steps left: "
                f"~{expected_saving(per_step, steps_left):.0f} s to save")
        if decision and self._compile(model):
            logging.info(f"image trunk fully frozen: compiling it, without autograd ({what}; --compile-frozen off "
                         "to disable)")
        else:
            logging.info(f"image trunk fully frozen: running it eagerly ({what}, not worth a compile)")

    def _compile(self, model: nn.Module) -> bool:
        self._compile_pending = compile_frozen_trunk(model, True)
        return self._compile_pending

    def _stop_timing(self) -> None:
        if self._timer is not None:
            self._timer.remove()
            self._timer = None


def compile_frozen_trunk(model: nn.Module, enable: bool) -> bool:
    """While every parameter of `model.visual.trunk` is frozen, run it compiled and without
    autograd (`--compile-frozen`); restore the plain forward as soon as any part trains.

    Only the bound `forward` is replaced, so parameter names, checkpoints and the DDP wrapper
    are unaffected. Returns whether the compiled forward is active.
    """
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        return False
    frozen = not any(p.requires_grad for p in trunk.parameters())
    active = "forward" in trunk.__dict__ and getattr(trunk.forward, "_frozen_compiled", False)
    if enable and frozen and not active:
        eager = type(trunk).forward.__get__(trunk)
        compiled = torch.compile(eager, dynamic=None)

        def forward(x, *args, **kwargs):
            with torch.no_grad():
                if forward._failed:
                    return eager(x, *args, **kwargs)
                try:
                    return compiled(x, *args, **kwargs)
                except Exception as e:  # no working compiler toolchain, an unsupported op, ...
                    # Compiling happens at the first call (and at a new input shape): fall back to
                    # the plain forward for the rest of the run instead of failing a long job.
                    forward._failed = True
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    logging.getLogger(__name__).warning(
                        f"compiling the frozen image trunk failed ({type(e).__name__}: {first}); running it eagerly")
                    return eager(x, *args, **kwargs)

        forward._failed = False

        forward._frozen_compiled = True
        trunk.forward = forward
        return True
    if active and not (enable and frozen):
        del trunk.forward  # back to the class's forward: the trunk trains now
        return False
    return active
