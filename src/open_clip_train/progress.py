"""One refreshing status line for interactive runs: step/total, loss, samples/s and ETA.

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
from typing import Callable, List, Optional, TextIO


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

    def update(self, step: int, loss: float, samples: int) -> None:
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
