"""The trainer's video entry points (`--dataset-type msrvtt`): config, pre-flight checks, data,
the model's video modules, evaluation rows and the --dry-run lines.

A video batch is (VideoFrames(frames, mask), tokens, ids): the frames and their mask travel as one
input, so the trainer, the objective and --accum-freq handle it like an image tensor (`.to()`),
and the model's forward takes it apart (video/model.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from torch.utils.data import default_collate

from ..data.bad_samples import Batch, BadTally
from .model import VIDEO_PREFIX, VideoModelCfg

TRAIN_SPLITS = ("9k", "7k")
TEST_SPLITS = ("1k-A", "full")


@dataclass(frozen=True)
class VideoCfg:
    """What --dataset-type msrvtt and the video flags select."""

    train_split: str = "9k"  # 9k | 7k | a csv with a video_id column
    test_split: str = "1k-A"
    video_root: Optional[str] = None  # default: <ROOT>/videos
    frames_root: Optional[str] = None  # an extracted frame store (extract_frames); mp4s decoded live if unset
    max_words: int = 32  # CLIP4Clip's max_words (start and end tokens included)
    model: VideoModelCfg = field(default_factory=VideoModelCfg)

    def __post_init__(self) -> None:
        if self.test_split not in TEST_SPLITS:
            raise ValueError(f"--msrvtt-test must be one of {TEST_SPLITS}, got {self.test_split!r}")
        if self.max_words < 2:
            raise ValueError(f"--max-words must be >= 2, got {self.max_words}")


class VideoFrames(NamedTuple):
    """frames [B, T, 3, H, W] and mask [B, T] (True = a real frame) as one model input."""

    frames: torch.Tensor
    mask: torch.Tensor

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "VideoFrames":
        return VideoFrames(self.frames.to(device=device, dtype=dtype, non_blocking=non_blocking),
                           self.mask.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "VideoFrames":
        return VideoFrames(self.frames.pin_memory(), self.mask.pin_memory())

    @property
    def shape(self) -> torch.Size:
        return self.frames.shape


def collate_train(items) -> Batch:
    """(frames, mask, tokens, ids, bad) items -> Batch(VideoFrames, tokens, ids) with .bad."""
    frames, mask, tokens, ids = default_collate([item[:-1] for item in items])
    return Batch((VideoFrames(frames, mask), tokens, ids), [b for item in items for b in item[-1]])


# ---------------------------------------------------------------------------------------------
# pre-flight


def check(video: VideoCfg, train_root: Optional[str], val_root: Optional[str]) -> None:
    """The files the flags name, before any process group or data read (ValueError: the user's)."""
    from .frame_store import read_spec
    from .msrvtt import DATA_JSON, TEST_1KA_CSV, TRAIN_CSVS

    for flag, root in (("--train-data", train_root), ("--val-data", val_root)):
        if root is None:
            continue
        if not Path(root).is_dir():
            raise ValueError(f"{flag} {root}: with --dataset-type msrvtt this is the folder holding {DATA_JSON}; "
                             "no such directory")
        if not (Path(root) / DATA_JSON).is_file():
            raise ValueError(f"{flag} {root}: no {DATA_JSON} in it (the MSR-VTT annotations)")
    if train_root is not None:
        csv = Path(train_root) / TRAIN_CSVS[video.train_split] if video.train_split in TRAIN_CSVS \
            else Path(video.train_split)
        if not csv.is_file():
            raise ValueError(f"--msrvtt-train-split {video.train_split}: {csv} not found")
    if val_root is not None and video.test_split == "1k-A" and not (Path(val_root) / TEST_1KA_CSV).is_file():
        raise ValueError(f"--msrvtt-test 1k-A: {Path(val_root) / TEST_1KA_CSV} not found")
    if video.frames_root is not None:
        spec = read_spec(video.frames_root)
        if spec.max_frames != video.model.max_frames:
            raise ValueError(f"--frames-root {video.frames_root}: extracted with max_frames {spec.max_frames}, "
                             f"not --max-frames {video.model.max_frames}; extract again or pass the same number")
    else:
        root = video.video_root or str(Path(train_root or val_root or ".") / "videos")
        if not Path(root).is_dir():
            raise ValueError(f"--video-root {root}: no such directory (or give --frames-root)")


# ---------------------------------------------------------------------------------------------
# data


def frame_source(video: VideoCfg, root: str):
    from .frame_store import LiveFrames, StoredFrames
    from .frames import FrameSpec

    spec = FrameSpec(max_frames=video.model.max_frames)
    if video.frames_root is not None:
        return StoredFrames(video.frames_root, expect=spec)
    return LiveFrames(video.video_root or Path(root) / "videos", spec)


def word_limited(tokenizer: Callable, max_words: int) -> Callable:
    from .dataset import WordLimitedTokenizer

    return WordLimitedTokenizer(tokenizer, max_words, int(getattr(tokenizer, "context_length", 77)))


def get_video_data(data_cfg, video: VideoCfg, transform: Callable, tokenizer: Callable, rank: int,
                   world_size: int) -> dict:
    """{'train': DataInfo} / {'val': VideoRetrievalData}. Frames use the tower's eval transform in
    training too (CLIP4Clip's: no augmentation)."""
    from ..data.loaders import DataInfo
    from .dataset import build_eval, build_train
    from .msrvtt import test_split, train_split

    tok = word_limited(tokenizer, video.max_words)
    out: dict = {}
    if data_cfg.train_data:
        split = train_split(data_cfg.train_data, video.train_split)
        loader, sampler = build_train(
            split, frame_source(video, data_cfg.train_data), transform, tok, max_frames=video.model.max_frames,
            batch_size=data_cfg.batch_size, caption_sampling=data_cfg.coco_caption_sampling, seed=data_cfg.seed,
            workers=data_cfg.workers, rank=rank, world_size=world_size, num_samples=data_cfg.train_num_samples,
            collate_fn=collate_train)
        out["train"] = DataInfo(loader, sampler, sampler.num_batches * data_cfg.batch_size * world_size,
                                sampler.num_batches)
    if data_cfg.val_data:
        split = test_split(data_cfg.val_data, video.test_split).head(data_cfg.val_num_samples)
        out["val"] = build_eval(split, frame_source(video, data_cfg.val_data), transform, tok,
                                video.model.max_frames)
    return out


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, data, world, device, precision: str, batch_size: int, workers: int, chunk_size: int,
             bad: BadTally) -> Dict[str, float]:
    from .evaluation import evaluate_video_retrieval

    return evaluate_video_retrieval(model, data, world, device, precision, batch_size, workers, chunk_size, bad)


def evaluated_entries(metrics: Dict[str, float]) -> int:
    """Videos the evaluation set had (usable + bad), for the bad-sample budget."""
    return int(metrics["msrvtt_num_videos"] + metrics["num_bad_videos"])


# ---------------------------------------------------------------------------------------------
# --dry-run


def describe_modules(model: torch.nn.Module, trainable: set) -> List[str]:
    """One line per video module: its parameter count and whether it trains."""
    pool = getattr(model, "video_pool", None)
    if pool is None:
        return []
    lines = []
    parts = [(n, m) for n, m in pool.named_children() if any(True for _ in m.parameters())]
    direct = [(n, p) for n, p in pool.named_parameters(recurse=False)]
    for name, params in [(n, list(m.named_parameters())) for n, m in parts] + [(n, [("", p)]) for n, p in direct]:
        full = [f"{VIDEO_PREFIX}{name}.{k}" if k else f"{VIDEO_PREFIX}{name}" for k, _ in params]
        count = sum(p.numel() for _, p in params)
        on = sum(n in trainable for n in full)
        state = "trainable" if on == len(full) else "frozen" if not on else f"{on}/{len(full)} tensors trainable"
        lines.append(f"video: {VIDEO_PREFIX}{name} {count:,} params, {state}")
    if not lines:
        lines.append(f"video: {pool.kind} pooling has no parameters")
    return lines
