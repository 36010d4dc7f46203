"""Loader building: the trainer's only entry point is get_data().

Sources (COCO captions json, CSV/TSV, webdataset shards, synthetic) are parsed by their
own modules into images with their captions; this module turns those into

* training: a DataInfo whose loader yields (images, tokens) batches, map-style sources
  sampled by GlobalBatchSampler (world-size invariant, resumable mid-epoch); with
  `with_ids` (a teacher cache) (images, tokens, ids), ids [N, 2] = (image id, caption id);
* evaluation: a RetrievalData of unique images and all their captions, so an image's
  other captions are never treated as negatives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .bad_samples import EMPTY_CAPTION, BadSample, BadTally, collate
from .coco import load_coco_captions
from .config import DataCfg
from .csv_data import load_csv_rows
from .datasets import (Captioned, ImageDataset, PairDataset, SyntheticDataset, Tokenizer, _name, _tokenize_all,
                       _transform_size)
from .sampler import GlobalBatchSampler, SharedEpoch, contiguous_shard
from .wds import build_train as build_wds_train
from .wds import load_eval as load_wds_eval


@dataclass
class DataInfo:
    dataloader: DataLoader
    sampler: GlobalBatchSampler | None
    num_samples: int  # global samples per epoch (num_batches * batch_size * world_size)
    num_batches: int  # per rank per epoch
    shared_epoch: SharedEpoch | None = None  # webdataset: epoch seen by loader workers
    _skip: int = 0  # streamed data: batches of the next pass to read and drop

    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        """Select the epoch's order and captions; start_batch, if given, skips that many
        batches of the next pass (mid-epoch resume). Map-style data skip them in the sampler
        (no sample is read); a stream has no index to seek to, so `batches()` reads and drops
        them: the stream is seeded per (seed, epoch, rank, worker), so what follows is exactly
        what an uninterrupted epoch would have trained on."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            if start_batch is not None:
                self.sampler.start_batch = start_batch
        else:
            self._skip = start_batch or 0
        if self.shared_epoch is not None:
            self.shared_epoch.set(epoch)

    def batches(self) -> Iterator:
        """One pass over the loader, from the position set_epoch selected."""
        skip, self._skip = self._skip, 0
        if skip:
            logging.info(f"streamed data: reading past {skip} batches already trained on")
        return islice(iter(self.dataloader), skip, None)


def _pin_memory() -> bool:
    return torch.cuda.is_available()


@dataclass
class RetrievalData:
    images: ImageDataset  # unique images -> (image_tensor, image_index)
    texts: torch.Tensor  # [T, ctx] tokenised captions, grouped by image in image order
    text_to_image: torch.Tensor  # [T] image index of each caption
    captions: list[str]
    dropped: BadTally = field(default_factory=BadTally)  # found while loading (empty captions, broken members)

    def image_loader(self, rank: int, world_size: int, batch_size: int, workers: int) -> DataLoader:
        """This rank's contiguous block of images, in order, yielding (images, image_indices)."""
        shard = contiguous_shard(len(self.images), rank, world_size)
        return DataLoader(
            Subset(self.images, range(shard.start, shard.stop)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=_pin_memory(),
            collate_fn=collate,
        )

    def text_shard(self, rank: int, world_size: int) -> slice:
        """This rank's contiguous block of texts."""
        return contiguous_shard(len(self.texts), rank, world_size)


def resolve_dataset_type(dataset_type: str, path: str) -> str:
    """'auto' -> the type a path's suffix names (.json coco, .csv/.tsv csv, .tar webdataset)."""
    return _resolve_type(dataset_type, path)


def _resolve_type(dataset_type: str, path: str) -> str:
    if dataset_type != "auto":
        return dataset_type
    suffix = path.rsplit(".", 1)[-1].lower()
    kinds = {"json": "coco", "csv": "csv", "tsv": "csv", "tar": "webdataset"}
    if suffix not in kinds:
        raise ValueError(f"{path}: cannot infer the dataset type from '.{suffix}'; set dataset_type")
    return kinds[suffix]


def load_captioned(kind: str, path: str, image_root: str | None = None, *, csv_img_key: str = "filepath",
                   csv_caption_key: str = "title", csv_separator: str = "\t") -> Captioned:
    """A COCO captions json or a CSV/TSV file (kind 'coco' / 'csv', or 'auto' by suffix)."""
    kind = _resolve_type(kind, path)
    if kind == "coco":
        coco = load_coco_captions(path, image_root)
        return Captioned(coco.paths, coco.captions, coco.image_ids, coco.ann_ids)
    if kind == "csv":
        images, captions, rows = load_csv_rows(path, csv_img_key, csv_caption_key, csv_separator, image_root)
        return Captioned(images, captions, list(range(len(images))), rows)
    raise ValueError(f"dataset type {kind!r} has no image/caption file")


def train_captioned(cfg: DataCfg) -> Captioned:
    """The training set of `cfg` (COCO or CSV) with its ids; what a teacher cache must cover."""
    return load_captioned(cfg.dataset_type, cfg.train_data or "", cfg.train_image_root, csv_img_key=cfg.csv_img_key,
                          csv_caption_key=cfg.csv_caption_key, csv_separator=cfg.csv_separator)


def _load_captioned(kind: str, path: str, image_root: str | None,
                    cfg: DataCfg) -> tuple[list[str], list[list[str]]]:
    c = load_captioned(kind, path, image_root, csv_img_key=cfg.csv_img_key, csv_caption_key=cfg.csv_caption_key,
                       csv_separator=cfg.csv_separator)
    return c.images, c.captions


def _map_train(dataset: Dataset, cfg: DataCfg, rank: int, world_size: int, epoch: SharedEpoch,
               group_offsets: torch.Tensor | None = None) -> DataInfo:
    sampler = GlobalBatchSampler(
        len(dataset), cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
        group_offsets=group_offsets, max_samples=cfg.train_num_samples, shared_epoch=epoch,
    )
    if sampler.num_batches == 0:
        source = cfg.train_data or cfg.dataset_type
        raise ValueError(f"{source}: {sampler.epoch_size} training samples per epoch do not fill "
                         f"one global batch of {cfg.batch_size} x {world_size} ranks")
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        pin_memory=_pin_memory(),
        generator=torch.Generator().manual_seed(cfg.seed + rank),  # worker base seeds
        collate_fn=collate,
    )
    global_batch = cfg.batch_size * world_size
    return DataInfo(loader, sampler, sampler.num_batches * global_batch, sampler.num_batches)


def _train(cfg: DataCfg, transform: Callable, tokenizer: Tokenizer, rank: int, world_size: int,
           with_ids: bool = False) -> DataInfo:
    kind = _resolve_type(cfg.dataset_type, cfg.train_data or "")
    epoch = SharedEpoch()
    if with_ids and kind not in ("coco", "csv"):
        raise ValueError(f"per-sample ids (a teacher cache) need coco or csv training data, not {kind}")
    if cfg.upsampling_factors is not None and kind != "webdataset":
        raise ValueError(f"upsampling factors weight webdataset sources ('a::b'), not {kind} data")
    if kind == "synthetic":
        if cfg.train_num_samples is None:
            raise ValueError("synthetic training data needs train_num_samples")
        dataset = SyntheticDataset(cfg.train_num_samples, _transform_size(transform), transform, tokenizer,
                                   cfg.seed, epoch)
        return _map_train(dataset, cfg, rank, world_size, epoch)
    if kind == "webdataset":
        streamed = build_wds_train(
            cfg.train_data, transform, tokenizer, batch_size=cfg.batch_size, workers=cfg.workers,
            seed=cfg.seed, rank=rank, world_size=world_size, num_samples=cfg.train_num_samples,
            resampled=cfg.dataset_resampled, pin_memory=_pin_memory(), upsampling_factors=cfg.upsampling_factors,
        )
        return DataInfo(streamed.loader, None, streamed.num_samples, streamed.num_batches,
                        streamed.shared_epoch)
    data = train_captioned(cfg)
    dataset = PairDataset(data.images, data.captions, transform, tokenizer, cfg.seed, epoch,
                          pair_ids=data.pair_ids() if with_ids else None)
    groups = dataset.offsets if cfg.coco_caption_sampling == "random" else None
    return _map_train(dataset, cfg, rank, world_size, epoch, groups)


def _drop_empty_captions(images: list, captions: list[list[str]], names: list[str] | None,
                         dropped: BadTally) -> tuple[list, list[list[str]], list[str] | None]:
    """Evaluation leaves empty captions out (and images left without any caption)."""
    keep = []
    for i, caps in enumerate(captions):
        good = [c for c in caps if c]
        name = names[i] if names is not None else _name(images[i], i)
        dropped.add(BadSample(EMPTY_CAPTION, name, i) for _ in range(len(caps) - len(good)))
        if good:
            keep.append(i)
        captions[i] = good
    pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
    return pick(images), pick(captions), pick(names)


def _val(cfg: DataCfg, transform: Callable, tokenizer: Tokenizer) -> RetrievalData:
    kind = _resolve_type(cfg.dataset_type, cfg.val_data)
    dropped = BadTally()
    names = None
    if kind == "webdataset":
        images, captions, names, broken = load_wds_eval(cfg.val_data, cfg.val_num_samples)
        dropped.add(broken)
    else:
        images, captions = _load_captioned(kind, cfg.val_data, cfg.val_image_root, cfg)
        images, captions = images[: cfg.val_num_samples], captions[: cfg.val_num_samples]
    images, captions, names = _drop_empty_captions(images, captions, names, dropped)
    if not images:
        raise ValueError(f"{cfg.val_data}: no evaluation image has a non-empty caption")
    flat = [c for cs in captions for c in cs]
    counts = torch.tensor([len(cs) for cs in captions], dtype=torch.long)
    return RetrievalData(
        images=ImageDataset(images, transform, names),
        texts=_tokenize_all(tokenizer, flat),
        text_to_image=torch.repeat_interleave(torch.arange(len(images)), counts),
        captions=flat,
        dropped=dropped,
    )


def get_data(cfg: DataCfg, preprocess_train: Callable, preprocess_val: Callable, tokenizer: Tokenizer,
             rank: int = 0, world_size: int = 1, *, with_ids: bool = False, video=None) -> dict:
    """{'train': DataInfo} if there is training data, {'val': RetrievalData} if val_data.
    with_ids: training batches also carry each sample's (image id, caption id) (Captioned).
    dataset_type 'msrvtt': video data selected by `video` (a VideoCfg; video/training.py), frames
    through `preprocess_val` in training too."""
    if cfg.dataset_type == "msrvtt":
        from ..video.training import get_video_data

        if video is None:
            raise ValueError("dataset type msrvtt needs its video settings")
        return get_video_data(cfg, video, preprocess_val, tokenizer, rank, world_size)
    data: dict = {}
    if cfg.train_data or cfg.dataset_type == "synthetic":
        data["train"] = _train(cfg, preprocess_train, tokenizer, rank, world_size, with_ids)
    if cfg.val_data:
        data["val"] = _val(cfg, preprocess_val, tokenizer)
    return data
