"""Which frames of a video a model sees, decoded with PyAV, and padding to a fixed length.

Sampling follows CLIP4Clip / TeachCLIP (`feature_framerate 1`, `slice_framepos 2`): the first frame
of every second (frame floor(s * fps) for s = 0, 1, ...), then, if that gives more than
`max_frames`, evenly spaced ones among them (linspace over their positions, truncated). They read
fps as an integer (OpenCV); here it is the stream's exact average rate, so at 29.97 fps a second
starts at frame floor(s * 29.97) rather than s * 29.

Frames are decoded in order (no seeking, so an index means the n-th decoded frame, exact for the
constant-frame-rate clips MSR-VTT has). A video that cannot be used raises BadVideo with a reason
from bad_samples, like an image.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.bad_samples import EMPTY_FILE, MISSING, UNREADABLE, BadImage

UNDECODABLE_VIDEO, NO_FRAMES = "undecodable video", "no frames"


class BadVideo(BadImage):
    """A video that cannot be used; `reason` is MISSING, EMPTY_FILE, UNDECODABLE_VIDEO or NO_FRAMES."""


@dataclass(frozen=True)
class FrameSpec:
    """How frames are taken from a video; a frame store records it in its manifest."""

    max_frames: int = 12
    frames_per_second: int = 1  # CLIP4Clip's feature_framerate
    short_side: int | None = None  # larger decoded frames are resized down to this short side

    def __post_init__(self) -> None:
        if self.max_frames < 1 or self.frames_per_second < 1:
            raise ValueError(f"need max_frames >= 1 and frames_per_second >= 1, got {self}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be >= 1 when set, got {self.short_side}")


def sample_indices(num_frames: int, fps: float, spec: FrameSpec) -> list[int]:
    """Frame indices to keep from a video of num_frames at fps: ascending, without repeats
    (below frames_per_second fps every frame is kept once)."""
    if num_frames <= 0:
        return []
    step = fps / spec.frames_per_second if fps > 0 else 1.0
    per_second = []
    k = 0
    while True:
        i = int(math.floor(k * step + 1e-9))
        if i >= num_frames:
            break
        if not per_second or i > per_second[-1]:
            per_second.append(i)
        k += 1
    if len(per_second) <= spec.max_frames:
        return per_second
    keep = np.linspace(0, len(per_second) - 1, num=spec.max_frames).astype(int)
    return [per_second[j] for j in keep]


def _resize_short(frame: np.ndarray, short_side: int | None) -> np.ndarray:
    h, w = frame.shape[:2]
    if short_side is None or min(h, w) <= short_side:
        return frame
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC))


def decode_frames(path: str | Path, spec: FrameSpec) -> np.ndarray:
    """The sampled frames of one video file as uint8 [n, H, W, 3] (RGB), n in 1..max_frames."""
    import av  # imported here: only decoding needs it, not the frame store reader

    try:
        if os.path.getsize(path) == 0:
            raise BadVideo(EMPTY_FILE, str(path))
    except (FileNotFoundError, NotADirectoryError):
        raise BadVideo(MISSING, str(path)) from None
    except PermissionError as e:
        raise BadVideo(UNREADABLE, str(e)) from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo(NO_FRAMES, f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = _read_sampled(container, stream, fps, spec)
    except BadVideo:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the demuxer/decoder raises is the file's fault
        raise BadVideo(UNDECODABLE_VIDEO, f"{path}: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadVideo(NO_FRAMES, str(path))
    return np.stack([_resize_short(f, spec.short_side) for f in frames])


def _read_sampled(container, stream, fps: float, spec: FrameSpec) -> list[np.ndarray]:
    if stream.frames > 0:  # the header's count: decode up to the last wanted frame only
        want = sample_indices(stream.frames, fps, spec)
        out, pos = [], 0
        for i, frame in enumerate(container.decode(stream)):
            if i == want[pos]:
                out.append(frame.to_ndarray(format="rgb24"))
                pos += 1
                if pos == len(want):
                    break
        return out
    # no count in the header: decode all, then pick
    every = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return [every[i] for i in sample_indices(len(every), fps, spec)]


def pad_frames(frames: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, ...] -> ([max_frames, ...] zero-padded, mask [max_frames] bool, True for real frames)."""
    n = frames.shape[0]
    if not 0 < n <= max_frames:  # pooling needs one real frame per video
        raise ValueError(f"a video needs 1 to max_frames ({max_frames}) frames, got {n}")
    out = frames.new_zeros((max_frames, *frames.shape[1:]))
    out[:n] = frames
    mask = torch.zeros(max_frames, dtype=torch.bool)
    mask[:n] = True
    return out, mask
