"""Non-finite losses and gradients: one cheap check per optimizer step, the same decision on
every rank, skip up to K such steps, then stop naming the step, the loss terms and the last
good checkpoint.

The step's decisions travel in one all-reduced vector (`step_flags`). Read at once
(`read_flags`), it makes the host wait for the step's kernels. With an optimizer whose update
can be dropped on the device (fused AdamW/SGD: `found_inf`, as GradScaler uses it), the trainer
does not wait: `failure_flag` skips the update on the device, the vector is copied to the host
without blocking (`PendingAgreement`) and read a step later, or at a log step, save or epoch end,
where the skip is logged and counted and a stop signal acted on. `skip_step` drops an update the
host has decided on.

With a GradScaler (fp16 amp on CUDA) inf/NaN gradients are the scaler's business: it skips
those steps and lowers the scale, so only a non-finite loss counts as a failure there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from . import distributed as dist_env
from .errors import RunFailure, flag
from .preempt import STOP_SIGNALS

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
                            f"({flag('skip_nonfinite_steps')})")
            return
        allowed = (f"more than {self.max_skips} such steps ({flag('skip_nonfinite_steps')} {self.max_skips})"
                   if self.max_skips else f"skipping is off ({flag('skip_nonfinite_steps')} K allows K)")
        message = (f"{head}; stopping: {allowed}; last good checkpoint: {last_good or 'none'}")
        logging.error(message)
        raise NonFiniteStop(message)


@dataclass(frozen=True)
class StepAgreement:
    """What every rank decides alike after a step's backward."""
    loss_bad: bool  # a loss term non-finite on some rank
    grads_bad: bool  # gradients non-finite on some rank
    bad_samples: int  # the step's bad samples, summed over ranks
    stop_signum: int  # a stop signal some rank received (0: none); SIGTERM before SIGUSR1


def step_flags(terms: Dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor], params: List[torch.Tensor],
               scaler_active: bool, bad_samples: int, device: torch.device, stop_signum: int = 0) -> torch.Tensor:
    """The step's decisions as ONE all-reduced vector on the device, not read: [loss flag, gradient
    flag, bad samples, one count per stop signal]. Gradients are only checked without a scaler (the
    scaler handles them), through clipping's total norm when clipping is on, else one fused norm
    over `params`."""
    loss_ok = all_finite(list(terms.values()))
    if scaler_active:
        grads_ok = torch.ones((), dtype=torch.bool, device=device)
    elif grad_norm is not None:
        grads_ok = grad_norm.isfinite()
    else:
        grads_ok = all_finite([p.grad for p in params])
    # Built on the device (fill kernels, no host->device copy that would wait for the step's
    # kernels), so reading it back is the only host sync the agreement needs.
    host = [float(bad_samples)] + [float(stop_signum == s) for s in STOP_SIGNALS]
    flags = torch.stack([(~loss_ok.to(device)).float(), (~grads_ok.to(device)).float()]
                        + [torch.full((), v, device=device) for v in host])
    return dist_env.all_reduce_sum(flags)


def read_flags(values: List[float]) -> StepAgreement:
    stop = next((int(s) for s, n in zip(STOP_SIGNALS, values[3:]) if n > 0), 0)
    return StepAgreement(values[0] > 0, values[1] > 0, int(values[2]), stop)


def failure_flag(flags: torch.Tensor, scaler_active: bool) -> torch.Tensor:
    """`is_failure` on the device: a 0-dim bool, True where the step's update must be dropped."""
    bad = flags[0] > 0
    return bad if scaler_active else bad | (flags[1] > 0)


@dataclass
class PendingAgreement:
    """A step's all-reduced flags on their way to the host: the copy is queued behind the step's
    kernels and read later (`read`), by which time the device is usually past it."""
    step: int  # the global optimizer step the flags belong to
    where: str  # "epoch E, step S of N", for the messages
    terms: Dict[str, torch.Tensor]  # the step's loss terms (named in a non-finite message)
    host: torch.Tensor
    event: Optional["torch.cuda.Event"] = None

    @classmethod
    def start(cls, flags: torch.Tensor, step: int, where: str, terms: Dict[str, torch.Tensor]) -> "PendingAgreement":
        if flags.device.type != "cuda":  # the host runs the kernels itself: nothing to wait for
            return cls(step, where, terms, flags)
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)  # the caching host allocator's
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(step, where, terms, host, event)

    def read(self) -> StepAgreement:
        if self.event is not None:
            self.event.synchronize()
        return read_flags(self.host.tolist())


def step_unless(optimizer: torch.optim.Optimizer, failed: torch.Tensor) -> None:
    """The optimizer's update, dropped inside its kernel where `failed` (a device flag) is True:
    the fused optimizers' `found_inf` contract, which GradScaler uses the same way (parameters,
    moments and step counts stay as they were)."""
    optimizer.grad_scale, optimizer.found_inf = None, failed.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def poison_gradients(optimizer: torch.optim.Optimizer, failed: torch.Tensor | bool) -> None:
    """Under a GradScaler: one gradient element becomes NaN where `failed` is True (a device flag
    or a host bool), so the scaler's own inf check drops the update and lowers the scale, as for
    any inf step. A False device flag adds 0."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_contiguous() and p.grad.numel():
                first = p.grad.view(-1)[:1]
                if isinstance(failed, torch.Tensor):
                    first.add_(torch.where(failed, float("nan"), 0.0).to(p.grad.dtype))
                elif failed:
                    first.fill_(float("nan"))
                return


def skip_step(optimizer: torch.optim.Optimizer, scaler) -> None:
    """No update from this step (decided on the host); with a grad scaler the step goes through
    its bookkeeping as an inf step, as on the deferred path (`poison_gradients`)."""
    if scaler is not None:
        poison_gradients(optimizer, True)
        scaler.unscale_(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
