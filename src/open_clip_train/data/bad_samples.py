"""Broken inputs found while loading: decoded to RGB where possible, otherwise counted.

A sample is bad when its image is missing, empty, truncated or undecodable, or its caption is
empty. Training replaces a bad sample by a deterministic substitute (so every rank's batch keeps
its size, which the feature all_gather needs, and results do not depend on workers or world
size) and carries what it replaced in the batch (`Batch.bad`), out of the DataLoader workers
into the training process, which sums it over ranks (`BadTally`).
"""
from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from torch.utils.data import default_collate

MISSING, EMPTY_FILE, TRUNCATED, UNDECODABLE, UNREADABLE = (
    "missing file", "empty file", "truncated image", "undecodable image", "unreadable file")
EMPTY_CAPTION = "empty caption"
BROKEN_MEMBER, NO_IMAGE, NO_CAPTION = "broken shard member", "no image", "no caption"


@dataclass(frozen=True)
class BadSample:
    reason: str
    source: str  # a path, or shard url + sample key
    index: int = -1  # dataset item (evaluation uses it to leave the image out)


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparent pixels are composited on white rather than dropped:
    what sits under alpha 0 is arbitrary (often black, which hides black logos and text),
    while white is what viewers and web pages show behind such images."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_rgb(source: str | bytes | Path) -> Image.Image:
    """Decode a file path or encoded bytes to RGB, or raise BadImage saying why not."""
    try:
        if isinstance(source, bytes):
            if not source:
                raise BadImage(EMPTY_FILE)
            stream = io.BytesIO(source)
        else:
            if os.path.getsize(source) == 0:
                raise BadImage(EMPTY_FILE)
            stream = source
        with Image.open(stream) as image:
            image.load()  # decode now: a truncated file fails here, not later in a transform
            return to_rgb(image)
    except BadImage:
        raise
    except (FileNotFoundError, NotADirectoryError) as e:
        raise BadImage(MISSING, str(e)) from None
    except (PermissionError, IsADirectoryError) as e:
        raise BadImage(UNREADABLE, str(e)) from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on this file is the file's fault
        reason = TRUNCATED if "truncated" in str(e).lower() or _cut_short(source) else UNDECODABLE
        raise BadImage(reason, f"{type(e).__name__}: {e}") from None


def _cut_short(source: str | bytes | Path) -> bool:
    """A JPEG without its end-of-image marker or a PNG without IEND: the file was cut off
    (PIL's own message for that varies with where the cut falls)."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError:
        return False
    tail = data.rstrip(b"\0")[-12:]
    if data.startswith(b"\xff\xd8"):
        return not tail.endswith(b"\xff\xd9")
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    return False


class Batch(tuple):
    """A loader batch: a plain tuple (images, tokens[, ids]) or (images, indices), plus `bad`,
    the BadSamples it replaced. Picklable (worker -> main process) and pinnable with its `bad`."""

    bad: tuple

    def __new__(cls, fields: Iterable, bad: Iterable[BadSample] = ()):
        self = super().__new__(cls, tuple(fields))
        self.bad = tuple(bad)
        return self

    def __reduce__(self):
        return Batch, (tuple(self), self.bad)

    def pin_memory(self, device=None) -> "Batch":
        return Batch((x.pin_memory() for x in self), self.bad)


def collate(items: Sequence[tuple]) -> Batch:
    """Items (field, ..., tuple of BadSample) -> Batch of the collated fields."""
    fields = default_collate([item[:-1] for item in items])
    return Batch(fields, [b for item in items for b in item[-1]])


def bad_of(batch) -> tuple:
    return getattr(batch, "bad", ())


@dataclass
class BadTally:
    """Bad samples by reason, with the first few sources as examples."""

    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    max_examples: int = 3

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, bad: Iterable[BadSample]) -> None:
        for b in bad:
            self.counts[b.reason] += 1
            if len(self.examples) < self.max_examples:
                self.examples.append(b.source)

    def merge(self, others: Iterable["BadTally"]) -> "BadTally":
        out = BadTally(Counter(self.counts), list(self.examples), self.max_examples)
        for other in others:
            out.counts.update(other.counts)
            out.examples += other.examples[: max(0, out.max_examples - len(out.examples))]
        return out

    def describe(self, of: int | None = None) -> str:
        """'3 bad samples of 160 (1.9%): missing file=1, truncated image=2; e.g. a.jpg, b.jpg'."""
        share = f" of {of} ({100 * self.total / of:.1f}%)" if of else ""
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        examples = f"; e.g. {', '.join(self.examples)}" if self.examples else ""
        return f"{self.total} bad sample{'' if self.total == 1 else 's'}{share}: {reasons or 'none'}{examples}"


def blank_like(transform, size: int) -> torch.Tensor:
    """The transform of a black image: the last-resort stand-in, so a batch always stacks."""
    return transform(Image.new("RGB", (size, size)))
