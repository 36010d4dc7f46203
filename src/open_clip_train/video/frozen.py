"""--frozen-feature-cache for --dataset-type msrvtt: the frozen image part's outputs per frame of
each training video (keyed by video number) and the frozen text tower's per caption (keyed by
sentence id), so every epoch trains only the frame aggregation (video_pool), the heads, the other
tower and the logit scale (frozen_features.py has the mechanism; this module its video side).

Valid because the training frames are deterministic: the same frames of a video every epoch
(frames.sample_indices: the first frame of each second, evenly thinned to --max-frames) through the
tower's eval transform (video training does not augment). Tables: `frames` [T, *row] (T = max
frames; padded positions hold the part's output for the all-zero frame the live run pads with),
`frame_mask` [T] (1 = real frame), `pad` [*row] (that zero-frame row: a video whose substitutes are
all bad is the live run's blank video), `text` [*row].

The manifest records the MSR-VTT root, its annotation file's and training list's sha256, the frame
source (frame store or video folder), the frame sampling, --max-frames, --max-words, the image
preprocessing, model, precision, the cached parts' weights sha256 and the dtype; `data_fields`
is the part checked in pre-flight, before the model is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.bad_samples import BadImage
from ..distill.cache import file_sha256, preprocess_fields
from ..frozen_features import EXTRACT_BATCH, FrozenFeatures, _Identity, _NormaliseOnly, _part_weights, _placeholder
from .dataset import _blank
from .feature_cache import tensors_sha256
from .frames import BadVideo
from .msrvtt import DATA_JSON, TRAIN_CSVS, video_numbers
from .training import VideoFrames


def _split_csv(root: str, split: str) -> Path:
    return Path(root) / TRAIN_CSVS[split] if split in TRAIN_CSVS else Path(split)


def frames_source(video, root: str) -> str:
    """Where the training frames are read from: the frame store, else the video folder."""
    return str(Path(video.frames_root or video.video_root or Path(root) / "videos").resolve())


def data_fields(cfg, parts: Dict[str, str]) -> Dict[str, Any]:
    """The manifest fields that decide the cached rows and need no model: pre-flight checks them."""
    from .distill_run import frame_sampling

    video, root = cfg.video, cfg.data.train_data
    split = _split_csv(root, video.train_split)
    out: Dict[str, Any] = {
        "model": cfg.model.name,
        "precision": cfg.model.precision,
        "data": {"root": str(Path(root).resolve()), "annotations_sha256": file_sha256(Path(root) / DATA_JSON),
                 "split": video.train_split if video.train_split in TRAIN_CSVS else str(split.resolve()),
                 "split_sha256": file_sha256(split)},
    }
    if "image" in parts:
        out["data"]["frames_source"] = frames_source(video, root)
        out["frames"] = {"max_frames": video.model.max_frames, "sampling": frame_sampling(video.frames_root)}
    if "text" in parts:
        out["text"] = {"max_words": video.max_words, "tokenizer": cfg.model.text_tokenizer}
    return out


class _FrameRows:
    """A cached image part's encode_frames: [B, T, *row] -> [B, T, D]; the head (`head`, the model's
    encode_image with its trunk swapped for the identity) runs on the rows when only the trunk is cached."""

    def __init__(self, head=None):
        self.head = head

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        b, t = rows.shape[:2]
        flat = rows.reshape(b * t, *rows.shape[2:])
        return (flat if self.head is None else self.head(flat)).reshape(b, t, -1)


class _KnownBadFrames:
    """A frame source that decodes nothing: re-raises the bad videos found at extraction, else one
    placeholder frame (the cached rows replace the frames and their mask)."""

    def __init__(self, source, bad: Dict[str, str]):
        self.source, self.bad = source, bad

    def load(self, video_id: str) -> np.ndarray:
        if video_id in self.bad:
            raise BadVideo(self.bad[video_id])
        return np.zeros((1, 1, 1, 3), dtype=np.uint8)

    def name(self, video_id: str) -> str:
        return self.source.name(video_id)


class _Clips(Dataset):
    """(number, frames [n, 3, H, W] or None, bad reason) of the dataset's videos in `order`."""

    def __init__(self, dataset, order: List[int], numbers: List[int]):
        self.dataset, self.order, self.numbers = dataset, order, numbers

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        i = self.order[k]
        d = self.dataset
        try:
            frames = d.frames.load(d.split.video_ids[i])
        except BadImage as e:
            return self.numbers[i], None, e.reason
        return self.numbers[i], torch.stack([d.transform(Image.fromarray(f)) for f in frames]), None


def _as_list(items):
    return items


class VideoFrozenFeatures(FrozenFeatures):
    BAD = "bad_videos"
    _bad: frozenset = frozenset()  # their numbers, once the cache is active

    def expected_meta(self, cfg, model: nn.Module, dataset, dtype: str) -> Dict[str, Any]:
        meta = data_fields(cfg, self.parts)
        meta.update({
            "parts": dict(self.parts),
            "weights_sha256": {t: tensors_sha256(_part_weights(model, t, p)) for t, p in self.parts.items()},
            "preprocess": preprocess_fields(model.visual.preprocess_cfg) if "image" in self.parts else None,
            "feature_dtype": dtype,
        })
        return meta

    def _numbers(self, dataset) -> List[int]:
        return video_numbers(dataset.split.video_ids)

    def check_covers(self, dataset) -> None:
        bad = {int(n) for n, _ in self.cache.manifest.get(self.BAD, [])}
        ids = dataset.pair_ids
        if "image" in self.parts:
            self.cache.check_covers("frames", [n for n in ids[:, 0].unique().tolist() if n not in bad],
                                    "the training videos")
            self.cache.check_covers("pad", [0], "the padding frame")
        if "text" in self.parts:
            self.cache.check_covers("text", ids[:, 1].tolist(), "the training captions")

    def _image_work(self, model, dataset, rank: int, size: int, device, workers: int):
        """Every size-th captioned video (from `rank`): [T, *row] per video, its frame mask, and on
        rank 0 the padding row; bad videos are listed instead."""
        run = self._image_run(model)
        numbers = self._numbers(dataset)
        counts = dataset.offsets.diff().tolist()
        order = sorted((i for i in range(len(numbers)) if counts[i] > 0), key=lambda i: numbers[i])[rank::size]
        t = dataset.max_frames
        zeros, _ = _blank(dataset.transform, 1)  # the live run's padding (and blank video) frame
        pad = run(zeros.to(device)).float().cpu()[0]
        loader = DataLoader(_Clips(dataset, order, numbers), batch_size=max(1, EXTRACT_BATCH // t),
                            num_workers=workers, collate_fn=_as_list)
        kept, rows, masks, bad = [], [], [], []
        for items in loader:
            good = [(n, f) for n, f, _ in items if f is not None]
            bad += [[n, r] for n, f, r in items if f is None]
            if not good:
                continue
            feats = run(torch.cat([f for _, f in good]).to(device)).float().cpu()
            start = 0
            for n, f in good:
                k = f.shape[0]
                row = pad.expand(t, *pad.shape).clone()
                row[:k] = feats[start:start + k]
                start += k
                kept.append(n)
                rows.append(row)
                masks.append(torch.arange(t) < k)
        work = {"frames": (kept, torch.stack(rows) if rows else torch.empty(0, t, *pad.shape)),
                "frame_mask": (kept, torch.stack(masks).float() if masks else torch.empty(0, t)),
                "pad": ([0], pad[None]) if rank == 0 else ([], pad[None][:0])}
        return work, bad

    # ---------------------------------------------------------------- train on the cache
    def _swaps(self, model: nn.Module) -> List[tuple]:
        out = []
        if self.parts.get("image") == "visual.trunk":
            out += [(model.visual.trunk, "forward", _Identity()), (model, "encode_frames", _FrameRows(model.encode_image))]
        elif "image" in self.parts:
            out.append((model, "encode_frames", _FrameRows()))
        if "text" in self.parts:
            out.append((model, "encode_text", _NormaliseOnly()))
        return out

    def _stop_decoding(self, dataset) -> Any:
        name = dict(zip(self._numbers(dataset), dataset.split.video_ids))
        self._bad = frozenset(int(n) for n, _ in self.cache.manifest.get(self.BAD, []))
        bad = {name[int(n)]: r for n, r in self.cache.manifest.get(self.BAD, []) if int(n) in name}
        saved = (dataset.frames, dataset.transform)
        dataset.frames, dataset.transform = _KnownBadFrames(dataset.frames, bad), _placeholder
        return saved

    def _resume_decoding(self, dataset, saved: Any) -> None:
        dataset.frames, dataset.transform = saved

    def _image_rows(self, numbers: List[int], dtype: torch.dtype) -> VideoFrames:
        """Cached rows and masks; a bad video that is in a batch (all its substitutes were bad too)
        is the live run's blank video: padding frames, frame 0 unmasked."""
        blank = [n not in self.cache.index["frames"] and n in self._bad for n in numbers]
        if not any(blank):
            return VideoFrames(self.cache.get("frames", numbers).to(dtype),
                               self.cache.get("frame_mask", numbers).bool())
        pad = self.cache.get("pad", [0])[0].to(dtype)
        t = self.cache.manifest["tables"]["frame_mask"]["row_shape"][0]
        rows = pad.expand(len(numbers), t, *pad.shape).clone()
        mask = torch.zeros(len(numbers), t, dtype=torch.bool)
        mask[:, 0] = True
        good = [k for k, b in enumerate(blank) if not b]
        if good:
            kept = [numbers[k] for k in good]
            rows[good] = self.cache.get("frames", kept).to(dtype)
            mask[good] = self.cache.get("frame_mask", kept).bool()
        return VideoFrames(rows, mask)

