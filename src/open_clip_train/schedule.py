"""Learning-rate schedules as pure functions of the optimizer step.

The schedule gives the *base* lr; every param group scales it by its own static
`lr_scale` (and an optional warm-up ramp for groups unlocked mid-run), see `optim.apply_lr`.
Semantics follow upstream open_clip's `cosine_lr`, `const_lr` and `const_lr_cooldown`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError, flag

KINDS = ("cosine", "const", "const-cooldown")


@dataclass(frozen=True)
class ScheduleCfg:
    kind: str  # 'cosine' | 'const' | 'const-cooldown'
    base_lr: float
    warmup_steps: int
    total_steps: int
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    cooldown_end_lr: float = 0.0

    def __post_init__(self) -> None:
        # Checked when the run is built: lr_at would only trip over a typo once warm-up is over.
        if self.kind not in KINDS:
            raise UserError(f"{flag('lr_scheduler')} {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise UserError(f"{flag('warmup')} and {flag('epochs_cooldown')} must be >= 0")


def _warmup(base_lr: float, warmup_steps: int, step: int) -> float:
    return base_lr * (step + 1) / warmup_steps


def lr_at(step: int, cfg: ScheduleCfg) -> float:
    """Base learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return _warmup(cfg.base_lr, cfg.warmup_steps, step)
    if cfg.kind == "const":
        return cfg.base_lr
    if cfg.kind == "cosine":
        done = step - cfg.warmup_steps
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * done / span)) * cfg.base_lr
    if cfg.kind == "const-cooldown":
        start_cooldown = cfg.total_steps - cfg.cooldown_steps
        if step < start_cooldown:
            return cfg.base_lr
        # Clamped: past the end a fractional power of a negative base would turn complex.
        frac = min(1.0, (step - start_cooldown) / max(cfg.cooldown_steps, 1))
        decay = (1 - frac) ** cfg.cooldown_power
        return decay * (cfg.base_lr - cfg.cooldown_end_lr) + cfg.cooldown_end_lr
    raise ValueError(f"unknown lr schedule {cfg.kind!r}")


def ramp(step: int, start_step: int, ramp_steps: int) -> float:
    """Linear 0 -> 1 over `ramp_steps` steps starting at `start_step` (1.0 when ramp_steps == 0)."""
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, (step - start_step + 1) / ramp_steps))
