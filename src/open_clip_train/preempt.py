"""Stopping on SIGTERM / SIGUSR1 (SLURM's warning before the time limit, torchrun's shutdown).

The handler only records the signal: the trainer acts on it at a step boundary once all ranks
have agreed on it (in the step's one all-reduce, `numerics.step_flags`; read a step later with a
fused optimizer, see trainer.py), writes a checkpoint of that exact step and exits with
EXIT_STOPPED. Nothing is done inside the handler itself, so a signal
that lands during a forward pass, an evaluation or a checkpoint write interrupts none of them.
"""
from __future__ import annotations

import signal
import threading
from typing import Dict

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL (sysexits.h): "temporary failure, try again": a checkpoint was saved, rerun with
# --resume latest. 0 is a finished run and 2 a user error.
EXIT_STOPPED = 75


class StopRequest:
    """The first stop signal received since `install` (0: none)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
