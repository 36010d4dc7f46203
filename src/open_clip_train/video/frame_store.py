"""A one-time store of sampled frames, read instead of the mp4 files.

Format: one `<video_id>.npy` per video holding the sampled frames as uint8 [n, H, W, 3] (RGB,
n <= max_frames), plus `manifest.json` (format version and the FrameSpec) and, per extracting rank,
`bad-<rank>.jsonl` with the videos that could not be decoded and why.

Why raw uint8 arrays and not JPEG folders: reading the store gives exactly the pixels live
decoding gives (JPEG would change the model's input and cost a decode per frame), so training from
the store equals training from the videos by construction; np.load of a ~2.8 MB array is a
sequential read, and MSR-VTT's 320x240 clips at 12 frames take ~28 GB for all 10,000 videos. Set
`short_side` when extracting from larger videos to bound the size.

Extraction shards the videos by rank (contiguous blocks; torchrun sets RANK / WORLD_SIZE), writes
each file atomically and skips videos already stored or recorded as bad, so an interrupted run
resumes (delete the bad-*.jsonl files to retry the bad ones).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..data.bad_samples import MISSING
from ..data.sampler import contiguous_shard
from .frames import BadVideo, FrameSpec, decode_frames
from .msrvtt import video_path

MANIFEST = "manifest.json"
FORMAT = "npy-uint8-nhwc-v1"


def frame_file(store: str | Path, video_id: str) -> Path:
    return Path(store) / f"{video_id}.npy"


def write_manifest(store: str | Path, spec: FrameSpec) -> None:
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, **asdict(spec)}, indent=1) + "\n")
    os.replace(tmp, store / MANIFEST)


def read_spec(store: str | Path) -> FrameSpec:
    path = Path(store) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not a frame store (no manifest); create it with extract_frames") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: frame store format {data.get('format')!r}, this version reads {FORMAT!r}")
    return FrameSpec(data["max_frames"], data["frames_per_second"], data["short_side"])


def save_frames(store: str | Path, video_id: str, frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
    final = frame_file(store, video_id)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, frames)
    os.replace(tmp, final)


def read_bad(store: str | Path) -> dict[str, str]:
    """video_id -> reason, for the videos extraction found unusable (all ranks)."""
    out: dict[str, str] = {}
    for path in sorted(Path(store).glob("bad-*.jsonl")):
        out.update(_read_bad_file(path))
    return out


def _read_bad_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["video_id"]: r["reason"] for r in records}


@dataclass
class ExtractReport:
    written: int = 0
    skipped: int = 0  # already in the store
    bad: dict[str, str] = field(default_factory=dict)


def extract(video_ids: Iterable[str], video_dir: str | Path, store: str | Path, spec: FrameSpec,
            rank: int = 0, world_size: int = 1, progress: Callable[[int, int], None] | None = None) -> ExtractReport:
    """Decode this rank's block of videos into the store (see the module docstring)."""
    ids = sorted(dict.fromkeys(video_ids))
    store = Path(store)
    if (store / MANIFEST).exists() and read_spec(store) != spec:
        raise ValueError(f"{store}: holds frames sampled as {read_spec(store)}, not {spec}; use another folder")
    if rank == 0:
        write_manifest(store, spec)
    store.mkdir(parents=True, exist_ok=True)
    mine = ids[contiguous_shard(len(ids), rank, world_size)]
    report = ExtractReport()
    bad_path = store / f"bad-{rank}.jsonl"
    known_bad = read_bad(store)  # from any earlier layout of ranks; delete bad-*.jsonl to retry them
    with bad_path.open("a") as bad_log:
        for n, vid in enumerate(mine):
            if frame_file(store, vid).exists() or vid in known_bad:
                report.skipped += 1
            else:
                try:
                    save_frames(store, vid, decode_frames(video_path(video_dir, vid), spec))
                    report.written += 1
                except BadVideo as e:
                    report.bad[vid] = e.reason
                    bad_log.write(json.dumps({"video_id": vid, "reason": e.reason, "detail": str(e)}) + "\n")
                    bad_log.flush()
                    logging.warning(f"bad video {vid}: {e}")
            if progress is not None:
                progress(n + 1, len(mine))
    return report


class LiveFrames:
    """Frames decoded from `<video_dir>/<video_id>.mp4` on every read."""

    def __init__(self, video_dir: str | Path, spec: FrameSpec) -> None:
        self.video_dir, self.spec = Path(video_dir), spec

    def load(self, video_id: str) -> np.ndarray:
        return decode_frames(video_path(self.video_dir, video_id), self.spec)

    def name(self, video_id: str) -> str:
        return str(video_path(self.video_dir, video_id))


class StoredFrames:
    """Frames read from a store written by `extract`; its FrameSpec is the manifest's."""

    def __init__(self, store: str | Path, expect: FrameSpec | None = None) -> None:
        self.store = Path(store)
        self.spec = read_spec(self.store)
        if expect is not None and expect.max_frames != self.spec.max_frames:
            raise ValueError(f"{self.store}: frames were extracted with max_frames {self.spec.max_frames}, "
                             f"not {expect.max_frames}; extract again or pass the same max_frames")
        self.bad = read_bad(self.store)

    def load(self, video_id: str) -> np.ndarray:
        try:
            return np.load(frame_file(self.store, video_id))
        except FileNotFoundError:
            reason = self.bad.get(video_id)
            raise BadVideo(reason or MISSING, f"{self.name(video_id)}"
                           f"{' (bad at extraction)' if reason else ' (not extracted)'}") from None

    def name(self, video_id: str) -> str:
        return str(frame_file(self.store, video_id))
