"""Video-text training and evaluation data, with the image datasets' conventions.

Training item i (one caption; see `VideoCaptions` for the order) -> (frames [T, 3, H, W],
mask [T] bool, tokens [ctx], ids [2] = (video number, sentence id), bad). A bad video is replaced
by a substitute drawn from (seed, epoch, i) alone, as `PairDataset` does for images, and reported
in `bad` for the trainer's BadTally; `data.bad_samples.collate` batches items into a `Batch`
(frames, mask, tokens, ids) with `.bad`. Evaluation has unique videos -> (frames, mask, index, bad):
a bad video is all-zero frames with its BadSample, for the evaluation loop to leave out.

Each frame goes through the image tower's own eval transform (`frame_transform`). Captions are
cut to `max_words` tokens (SOT and EOT included, as CLIP4Clip's max_words) and padded back to the
tower's context length (`WordLimitedTokenizer`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.bad_samples import EMPTY_CAPTION, BadImage, BadSample, BadTally, collate
from ..data.sampler import GlobalBatchSampler, SharedEpoch, contiguous_shard, sample_seed, seeded_rng
from .frames import pad_frames
from .msrvtt import VideoCaptions

FALLBACK_TRIES = 8  # substitutes drawn for a bad sample before black frames stand in
Tokenizer = Callable[..., torch.Tensor]


class FrameSource(Protocol):
    def load(self, video_id: str) -> np.ndarray: ...  # uint8 [n, H, W, 3] or raises BadVideo
    def name(self, video_id: str) -> str: ...


def frame_transform(model: torch.nn.Module) -> Callable:
    """The image tower's eval transform (its size, resize mode, mean/std) from its preprocess_cfg."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)


class WordLimitedTokenizer:
    """tokenizer(texts) cut to max_words tokens (the end token kept last), padded to the tower's length."""

    def __init__(self, tokenizer: Tokenizer, max_words: int, context_length: int) -> None:
        if not 2 <= max_words <= context_length:
            raise ValueError(f"max_words must be in [2, {context_length}] (the text tower's length), got {max_words}")
        self.tokenizer, self.max_words, self.context_length = tokenizer, max_words, context_length
        self.pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, context_length=self.max_words)
        return F.pad(tokens, (0, self.context_length - tokens.shape[1]), value=self.pad_id)


def _frames_tensor(frames: np.ndarray, transform: Callable, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack([transform(Image.fromarray(f)) for f in frames])
    return pad_frames(stacked, max_frames)


def _transform_size(transform: Callable, default: int = 224) -> int:
    """The first size a (torchvision Compose) transform resizes or crops to."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and size):
            return int(size) if isinstance(size, int) else int(max(size))
    return default


def _blank(transform: Callable, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in: black frames at the transform's size, mask True on frame 0 only (pooling needs one)."""
    size = _transform_size(transform)
    one = transform(Image.new("RGB", (size, size)))
    frames = one.new_zeros((max_frames, *one.shape))
    mask = torch.zeros(max_frames, dtype=torch.bool)
    mask[0] = True
    return frames, mask


class VideoPairDataset(Dataset):
    """Every (video, caption) pair of a split, flattened video by video (see the module docstring)."""

    def __init__(self, split: VideoCaptions, frames: FrameSource, transform: Callable, tokenizer: Tokenizer,
                 max_frames: int, seed: int, epoch: SharedEpoch) -> None:
        self.split, self.frames, self.transform, self.tokenizer = split, frames, transform, tokenizer
        self.max_frames, self.seed, self.epoch = max_frames, seed, epoch
        self.captions = split.flat_captions()
        self.pair_video = split.text_to_video()
        self.pair_ids = split.pair_ids()
        self.offsets = split.offsets()

    def __len__(self) -> int:
        return len(self.captions)

    def _pair(self, j: int) -> tuple[np.ndarray, str]:
        if not self.captions[j]:
            raise BadImage(EMPTY_CAPTION)
        return self.frames.load(self.split.video_ids[int(self.pair_video[j])]), self.captions[j]

    def __getitem__(self, i: int) -> tuple:
        seed = sample_seed(self.seed, self.epoch.get(), i)
        bad, j, draw = (), i, random.Random(seed)
        for _ in range(1 + FALLBACK_TRIES):
            try:
                frames, caption = self._pair(j)
                break
            except BadImage as e:
                if not bad:
                    vid = self.split.video_ids[int(self.pair_video[i])]
                    bad = (BadSample(e.reason, self.frames.name(vid), i),)
                j = draw.randrange(len(self))
        else:
            frames, caption, j = None, self.captions[i], i
        with seeded_rng(seed):
            pixels, mask = _blank(self.transform, self.max_frames) if frames is None \
                else _frames_tensor(frames, self.transform, self.max_frames)
        tokens = self.tokenizer([caption])[0]
        return pixels, mask, tokens, self.pair_ids[j], bad


class VideoDataset(Dataset):
    """Unique evaluation videos: item i -> (frames, mask, i, bad)."""

    def __init__(self, video_ids: list[str], frames: FrameSource, transform: Callable, max_frames: int) -> None:
        self.video_ids, self.frames, self.transform, self.max_frames = video_ids, frames, transform, max_frames

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> tuple:
        vid = self.video_ids[i]
        try:
            pixels, mask = _frames_tensor(self.frames.load(vid), self.transform, self.max_frames)
            return pixels, mask, i, ()
        except BadImage as e:
            pixels, mask = _blank(self.transform, self.max_frames)
            return pixels, mask, i, (BadSample(e.reason, self.frames.name(vid), i),)


@dataclass
class VideoRetrievalData:
    """Unique test videos and all their captions (a video's other captions are never negatives)."""

    videos: VideoDataset
    texts: torch.Tensor  # [C, ctx] tokens, grouped by video in video order
    text_to_video: torch.Tensor  # [C]
    captions: list[str]
    dropped: BadTally = field(default_factory=BadTally)  # empty captions left out while loading

    def video_loader(self, rank: int, world_size: int, batch_size: int, workers: int) -> DataLoader:
        """This rank's contiguous block of videos, in order: Batch (frames, mask, indices) + .bad."""
        shard = contiguous_shard(len(self.videos), rank, world_size)
        return DataLoader(Subset(self.videos, range(shard.start, shard.stop)), batch_size=batch_size,
                          shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available(),
                          collate_fn=collate)

    def text_shard(self, rank: int, world_size: int) -> slice:
        return contiguous_shard(len(self.texts), rank, world_size)


def build_eval(split: VideoCaptions, frames: FrameSource, transform: Callable, tokenizer: Tokenizer,
               max_frames: int) -> VideoRetrievalData:
    """Evaluation data; empty captions (and videos left without one) are dropped and counted."""
    dropped = BadTally()
    keep = VideoCaptions([], [], [])
    for i, (vid, caps, ids) in enumerate(zip(split.video_ids, split.captions, split.sentence_ids)):
        good = [(c, s) for c, s in zip(caps, ids) if c]
        dropped.add(BadSample(EMPTY_CAPTION, vid, i) for _ in range(len(caps) - len(good)))
        if good:
            keep.video_ids.append(vid)
            keep.captions.append([c for c, _ in good])
            keep.sentence_ids.append([s for _, s in good])
    if not keep.video_ids:
        raise ValueError("no test video has a non-empty caption")
    flat = keep.flat_captions()
    texts = torch.cat([tokenizer(flat[i:i + 1024]) for i in range(0, len(flat), 1024)]).long()
    return VideoRetrievalData(VideoDataset(keep.video_ids, frames, transform, max_frames), texts,
                              keep.text_to_video(), flat, dropped)


def build_train(split: VideoCaptions, frames: FrameSource, transform: Callable, tokenizer: Tokenizer, *,
                max_frames: int, batch_size: int, caption_sampling: str = "all", seed: int = 0, workers: int = 0,
                rank: int = 0, world_size: int = 1, num_samples: int | None = None,
                collate_fn: Callable = collate) -> tuple[DataLoader, GlobalBatchSampler]:
    """Loader and its GlobalBatchSampler (set_epoch, start_batch, num_batches), as the image data's.
    caption_sampling: 'all' (a sample per caption) or 'random' (one caption per video per epoch)."""
    if caption_sampling not in ("all", "random"):
        raise ValueError(f"caption_sampling must be 'all' or 'random', got {caption_sampling!r}")
    epoch = SharedEpoch()
    dataset = VideoPairDataset(split, frames, transform, tokenizer, max_frames, seed, epoch)
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed,
                                 group_offsets=dataset.offsets if caption_sampling == "random" else None,
                                 max_samples=num_samples, shared_epoch=epoch)
    if sampler.num_batches == 0:
        raise ValueError(f"{sampler.epoch_size} training samples per epoch do not fill one global batch of "
                         f"{batch_size} x {world_size} ranks")
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(seed + rank), collate_fn=collate_fn)
    return loader, sampler
