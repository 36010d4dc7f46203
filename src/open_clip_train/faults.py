"""Fault injection for the reliability tests: `OPEN_CLIP_TRAIN_FAULT=<kind>:<step>[:rank=<r>]`.

A test hook, inert when the variable is unset (`main` installs nothing and every hook is a
single `is None` check). Kinds, all at global optimizer step `<step>`:

* `crash_at_step`: raise an exception after the step (a worker crash: traceback, exit 1);
* `kill_at_step`: SIGKILL this process after the step (and after any checkpoint of it);
* `sigterm_at_step`, `sigusr1_at_step`: send that signal to this process during the step,
  before the ranks agree on it (`in_step`), so the run stops after that step;
* `sigterm_parent_at_step`: send SIGTERM to the parent process (torchrun's agent, which
  forwards it to every worker), also during the step;
* `kill_in_save`: SIGKILL this process while it writes the checkpoint of that step, after
  half of the temporary file is on disk;
* `nan_loss_at_step`: a NaN first loss term in that step, after its backward (the gradients stay
  finite), so with `:rank=<r>` only the ranks' agreement can make the other ranks skip it too.

`:rank=<r>` limits the fault to one rank. A fault fires only in the first attempt of a torchrun
group (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted group does not fail again.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import BinaryIO, Mapping, Optional

from .errors import UserError

ENV = "OPEN_CLIP_TRAIN_FAULT"
_SIGNALS = {"sigterm_at_step": signal.SIGTERM, "sigusr1_at_step": signal.SIGUSR1}
KINDS = ("crash_at_step", "kill_at_step", "sigterm_parent_at_step", "kill_in_save", "nan_loss_at_step", *_SIGNALS)


class InjectedCrash(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None

    def applies(self, step: int, rank: int) -> bool:
        return step == self.step and (self.rank is None or rank == self.rank)


def parse(text: str) -> Fault:
    parts = text.strip().split(":")
    usage = f"{ENV}={text!r}: expected <kind>:<step>[:rank=<r>] with kind one of {', '.join(KINDS)}"
    if len(parts) not in (2, 3) or parts[0] not in KINDS or not parts[1].isdigit():
        raise UserError(usage)
    rank = None
    if len(parts) == 3:
        key, _, value = parts[2].partition("=")
        if key != "rank" or not value.isdigit():
            raise UserError(usage)
        rank = int(value)
    return Fault(parts[0], int(parts[1]), rank)


def from_env(environ: Mapping[str, str] = os.environ) -> Optional[Fault]:
    """The fault to inject in this process, or None (unset, or a restarted torchrun attempt)."""
    text = environ.get(ENV)
    if not text:
        return None
    fault = parse(text)
    if environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return fault


_active: Optional[Fault] = None
_rank = 0


def install(fault: Optional[Fault], rank: int) -> None:
    global _active, _rank
    _active, _rank = fault, rank


def at_step(step: int) -> None:
    """Called by the trainer at every step boundary: the crash and kill faults."""
    if _active is None or _active.kind not in ("crash_at_step", "kill_at_step") or not _active.applies(step, _rank):
        return
    if _active.kind == "crash_at_step":
        raise InjectedCrash(f"injected crash at step {step} ({ENV})")
    os.kill(os.getpid(), signal.SIGKILL)


def in_step(step: int) -> None:
    """Called by the trainer in step `step` before the ranks' agreement on it: the signal faults."""
    if _active is None or not _active.applies(step, _rank):
        return
    if _active.kind == "sigterm_parent_at_step":
        os.kill(os.getppid(), signal.SIGTERM)
    elif _active.kind in _SIGNALS:
        os.kill(os.getpid(), _SIGNALS[_active.kind])


def loss_terms(step: int, terms: dict) -> dict:
    """Called by the trainer with step `step`'s loss terms, after its backward: `nan_loss_at_step`."""
    if _active is None or _active.kind != "nan_loss_at_step" or not _active.applies(step, _rank):
        return terms
    first = next(iter(terms))
    return dict(terms, **{first: terms[first] * float("nan")})


def in_save(f: BinaryIO, step: Optional[int]) -> None:
    """Called by atomic_save with the temporary file fully written but not yet renamed:
    cut it to half and die, as a kill in the middle of the write would leave it."""
    if _active is None or _active.kind != "kill_in_save" or step is None or not _active.applies(step, _rank):
        return
    f.flush()
    f.truncate(f.tell() // 2)
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
