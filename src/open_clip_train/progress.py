"""Progress reporting: the interval meter and the `Train Epoch:` log line / metrics row of
each logging step (`TrainLog`), and one refreshing status line for interactive runs
(`ProgressLine`): step/total, loss, samples/s and ETA.

Shown only on rank 0 and only when its stream (stderr) is a terminal: a batch job, a run
redirected to a file or piped (`2>&1 | tee`) and out.log never see it, and the log lines
are unchanged. It is drawn with a carriage return and padded over its previous length (no
escape codes, no new dependency). While it is up, a filter on the logging handlers that
write to the same stream wipes it before each record, so every log line starts at column 0
exactly as in out.log; the next update draws it again under the log line. The cursor is left
at column 0, so a line another rank writes to the same terminal (torchrun workers share it)
overwrites the progress line instead of being appended to it.

    with ProgressLine(steps_per_epoch, epoch, epochs, enabled=world.is_master) as progress:
        for step in ...:
            progress.update(step + 1, loss, samples_this_step)
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TextIO

import torch


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def fmt_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _ClearBeforeRecord(logging.Filter):
    """Wipes the progress line before a handler writes a record to the same stream."""

    def __init__(self, progress: "ProgressLine"):
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class ProgressLine:
    """The status line of one epoch of `total` optimizer steps (of `epochs`, for the ETA).

    Inactive (writes nothing at all) unless `enabled` and `stream` is a TTY. Redraws at most
    every `min_interval` seconds, and always for the last step and after a log line."""

    def __init__(self, total: int, epoch: int = 0, epochs: int = 1, *, enabled: bool = True,
                 stream: Optional[TextIO] = None, min_interval: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter, width: Optional[int] = None):
        self.stream = stream if stream is not None else sys.stderr
        self.active = enabled and total > 0 and is_terminal(self.stream)
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.min_interval, self.clock, self.width = min_interval, clock, width
        self.t0 = clock()
        self.samples = 0
        self.shown = 0  # length of the line now on screen (0: none)
        self.last_draw: Optional[float] = None
        self._filter = _ClearBeforeRecord(self)
        self._handlers: List[logging.Handler] = []

    def __enter__(self) -> "ProgressLine":
        if self.active:
            self.t0 = self.clock()
            self._handlers = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is self.stream]
            for h in self._handlers:
                h.addFilter(self._filter)
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        self.clear()
        for h in self._handlers:
            h.removeFilter(self._filter)
        self._handlers = []

    def update(self, step: int, loss: float | torch.Tensor, samples: int) -> None:
        """After step `step` (1-based) of this epoch, which trained `samples` samples (all ranks)."""
        if not self.active:
            return
        self.samples += samples
        now = self.clock()
        due = self.last_draw is None or now - self.last_draw >= self.min_interval
        if not (due or self.shown == 0 or step >= self.total):
            return
        self._draw(self.text(step, loss, now))
        self.last_draw = now

    def text(self, step: int, loss: float, now: float) -> str:
        elapsed = max(now - self.t0, 1e-9)
        remaining = (self.total - step) + self.total * (self.epochs - self.epoch - 1)
        eta = fmt_duration(elapsed / max(step, 1) * remaining)
        return (f"epoch {self.epoch + 1}/{self.epochs}  step {step}/{self.total}  loss {float(loss):.4f}  "
                f"{self.samples / elapsed:.1f} samples/s  ETA {eta}")

    def clear(self) -> None:
        if self.shown:
            self._write("\r" + " " * self.shown + "\r")
            self.shown = 0

    def _draw(self, text: str) -> None:
        text = text[: max(self._columns() - 1, 1)]  # a wrapped line cannot be redrawn with \r
        self._write("\r" + text.ljust(self.shown) + "\r")
        self.shown = len(text)

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return int(os.environ.get("COLUMNS", 80)) if os.environ.get("COLUMNS", "").isdigit() else 80

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not stop training
            self.active, self.shown = False, 0


@dataclass
class IntervalMeter:
    """Samples/s and loss averaged over the logging interval (not just the last step)."""
    t0: float = field(default_factory=time.perf_counter)
    samples: int = 0
    steps: int = 0
    data_time: float = 0.0
    # Sums in float64 where the terms live (the device): adding them costs no host read, and
    # the sums equal Python's float sums of the same values, term by term.
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, samples: int, terms: Dict[str, torch.Tensor | float], data_time: float,
            keep: bool | torch.Tensor = True) -> None:
        """`keep` False leaves a skipped step's losses out; a device flag does it on the device
        (0 added where it is False), when the skip is not known on the host yet."""
        self.samples += samples
        self.steps += 1
        self.data_time += data_time
        if keep is False:
            return
        for k, v in terms.items():
            v = torch.as_tensor(v).detach().to(torch.float64)
            if isinstance(keep, torch.Tensor):
                v = torch.where(keep, v, 0.0)
            self.losses[k] = self.losses[k] + v if k in self.losses else v

    def mean_losses(self, device: torch.device, kept: int) -> torch.Tensor:
        """The interval's mean of each term over its `kept` (not skipped) steps, in the order of
        `losses`, one float64 vector."""
        if not self.losses:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.stack([v.to(device) for v in self.losses.values()]) / max(kept, 1)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)


@dataclass
class TrainLog:
    """One logging step's numbers: out.log's `Train Epoch:` line (upstream's format plus the
    global step and every param group's lr) and the metrics.jsonl row come from the same values."""
    epoch: int
    step: int  # global optimizer step
    epoch_step: int  # optimizer steps done in this epoch
    steps_per_epoch: int
    samples: int  # samples done in this epoch, all ranks
    samples_per_epoch: int
    data_time: float  # seconds per step
    batch_time: float
    samples_per_second: float
    world_size: int
    lr: Dict[str, float]  # param group name -> lr
    logit_scale: float
    losses: Dict[str, float]  # mean over the interval and the ranks
    eta_seconds: float
    skipped_nonfinite: int
    trainable: Dict[str, int]  # visual, text, total

    def line(self) -> str:
        losses = " ".join(f"{k.capitalize()}: {v:#.5g}" for k, v in self.losses.items())
        lrs = " ".join(f"{name}={lr:.3e}" for name, lr in self.lr.items())
        sps = self.samples_per_second
        return (f"Train Epoch: {self.epoch} [{self.samples}/{self.samples_per_epoch} "
                f"({100 * self.epoch_step / self.steps_per_epoch:.0f}%)] step {self.step} "
                f"Data (t): {self.data_time:.3f} Batch (t): {self.batch_time:.3f}, "
                f"{sps:#g}/s, {sps / self.world_size:#g}/s/gpu LR: {lrs} Logit Scale: {self.logit_scale:.3f} "
                f"{losses} ETA: {fmt_duration(self.eta_seconds)}"
                + (f" Skipped non-finite: {self.skipped_nonfinite}" if self.skipped_nonfinite else ""))

    def row(self) -> Dict[str, Any]:
        """The metrics.jsonl object (read back by the compare tool)."""
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "steps_per_epoch": self.steps_per_epoch, "samples": self.samples,
                "samples_per_epoch": self.samples_per_epoch, "losses": dict(self.losses), "lr": dict(self.lr),
                "samples_per_second": self.samples_per_second, "logit_scale": self.logit_scale,
                "data_time": self.data_time, "batch_time": self.batch_time,
                "skipped_nonfinite": self.skipped_nonfinite, "trainable": dict(self.trainable)}
