"""Non-finite losses and gradients: one cheap check per optimizer step, the same decision on
every rank, skip up to K such steps, then stop naming the step, the loss terms and the last
good checkpoint.

With a GradScaler (fp16 amp on CUDA) inf/NaN gradients are the scaler's business: it skips
those steps and lowers the scale, so only a non-finite loss counts as a failure there.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from .errors import RunFailure

EXIT_CODE = RunFailure.exit_code


class NonFiniteStop(RunFailure):
    pass


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One fused check (a norm per tensor, then one reduction), as a 0-dim bool tensor: no
    host sync here, so the caller decides when to read it."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(True)
    norms = torch._foreach_norm(tensors)
    return torch.stack([n.float() for n in norms]).sum().isfinite()


def is_failure(loss_finite: bool, grads_finite: bool, scaler_active: bool) -> bool:
    """Whether a step counts as a non-finite failure (see the module doc for the scaler)."""
    return not loss_finite or (not grads_finite and not scaler_active)


def format_terms(terms: Dict[str, torch.Tensor | float]) -> str:
    return ", ".join(f"{k}={float(v):.6g}" for k, v in terms.items())


class NonFiniteGuard:
    """Counts skipped steps; `failed` logs the skip or raises NonFiniteStop past the budget."""

    def __init__(self, max_skips: int = 0):
        if max_skips < 0:
            raise ValueError(f"skip_nonfinite_steps must be >= 0, got {max_skips}")
        self.max_skips = max_skips
        self.skipped = 0

    def failed(self, what: str, step: int, where: str, terms: Dict[str, float],
               last_good: Optional[Path]) -> None:
        self.skipped += 1
        head = f"non-finite {what} at step {step} ({where}): {format_terms(terms)}"
        if self.skipped <= self.max_skips:
            logging.warning(f"{head}; step skipped (no update), {self.skipped} of at most {self.max_skips} "
                            f"(--skip-nonfinite-steps)")
            return
        allowed = (f"more than {self.max_skips} such steps (--skip-nonfinite-steps {self.max_skips})"
                   if self.max_skips else "skipping is off (--skip-nonfinite-steps K allows K)")
        message = (f"{head}; stopping: {allowed}; last good checkpoint: {last_good or 'none'}")
        logging.error(message)
        raise NonFiniteStop(message)
