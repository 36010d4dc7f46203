"""WebDataset tar shards (upstream layout: jpg/png/jpeg/webp image + txt caption per sample).

Training streams shards as upstream does (shard shuffle per epoch, split by rank and by
worker, sample shuffle buffer, fixed number of batches per worker), but every random
choice is seeded from (seed, epoch, rank, worker) or, for augmentation, from
(seed, epoch, sample key), so runs are reproducible. Evaluation reads the shards
sequentially in this process.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import zlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .bad_samples import BROKEN_MEMBER, EMPTY_CAPTION, NO_CAPTION, NO_IMAGE, BadImage, BadSample, Batch, decode_rgb
from .sampler import SharedEpoch, sample_seed, seeded_rng

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")
_SAMPLE_SHUFFLE_SIZE = 5000  # upstream's buffer sizes
_SAMPLE_SHUFFLE_INITIAL = 1000


@dataclass
class WdsTrain:
    loader: DataLoader
    num_samples: int  # global samples per epoch, rounded up to whole batches per worker
    num_batches: int  # per rank
    shared_epoch: SharedEpoch


def shard_urls(spec: str) -> list[str]:
    """Brace-expanded urls, '::' separating several lists (as upstream)."""
    return list(wds.shardlists.expand_urls(spec))


def shard_weights(spec: str, factors: str) -> tuple[list[str], list[float]]:
    """Upstream's weighted expand_urls: each '::' source's shards, each shard weighted by its source's
    factor (so a source's share of the draws is factor x its shard count over the total)."""
    sources, parts = spec.split("::"), factors.split("::")
    if len(parts) != len(sources):
        raise ValueError(f"{len(parts)} upsampling factors ({factors}) for {len(sources)} '::' data sources; "
                         "give one per source")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"upsampling factors {factors!r}: numbers separated by '::', e.g. 1::2") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise ValueError(f"upsampling factors {factors!r}: need finite numbers >= 0, not all 0")
    urls, per_url = [], []
    for source, w in zip(sources, weights):
        expanded = shard_urls(source)
        urls += expanded
        per_url += [w] * len(expanded)
    return urls, per_url


def dataset_size(urls: list[str]) -> int | None:
    """Total samples from sizes.json or __len__ next to the first shard (as upstream)."""
    folder = Path(urls[0]).parent
    if (folder / "sizes.json").exists():
        sizes = json.loads((folder / "sizes.json").read_text())
        try:
            return sum(int(sizes[Path(u).name]) for u in urls)
        except KeyError:
            return None  # sizes.json does not cover every shard
    if (folder / "__len__").exists():
        return int(ast.literal_eval((folder / "__len__").read_text()))
    return None


def _worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _stream_seed(seed: int, epoch: int, rank: int) -> int:
    worker, num_workers = _worker_id()
    return sample_seed(seed, epoch, rank * num_workers + worker)


def _train_shards(urls: list[str], seed: int, epoch: SharedEpoch, rank: int, world_size: int,
                  resampled: bool, weights: list[float] | None = None) -> Callable[[], Iterator[dict]]:
    """Shard urls for this rank and worker: a seeded permutation, or draws with replacement
    (weighted by `weights`, one per url, when given: upsampling factors)."""

    def shuffled() -> Iterator[dict]:
        order = list(urls)
        random.Random(seed + epoch.get()).shuffle(order)  # same on every rank and worker
        worker, num_workers = _worker_id()
        mine = islice(order, rank * num_workers + worker, None, world_size * num_workers)
        return (dict(url=u) for u in mine)

    def drawn() -> Iterator[dict]:
        rng = random.Random(_stream_seed(seed, epoch.get(), rank))  # distinct per rank and worker
        while True:  # endless: with_epoch decides when the epoch ends
            yield dict(url=rng.choice(urls) if weights is None else rng.choices(urls, weights)[0])

    return drawn if resampled else shuffled


def _sample_name(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _problem(sample: dict) -> str | None:
    """Why a raw sample cannot be a pair (or None): no image member, no or an empty caption."""
    if not any(ext in sample for ext in IMAGE_EXTS):
        return NO_IMAGE
    if "txt" not in sample:
        return NO_CAPTION
    try:
        if not sample["txt"].decode("utf-8").strip():
            return EMPTY_CAPTION
    except UnicodeDecodeError:
        return "undecodable caption"
    return None


class _Recorder:
    """Collects this process's bad samples: webdataset's exception handler for broken tar
    members (counted, then continue, as wds.warn_and_continue does), plus our own finds."""

    def __init__(self) -> None:
        self.found: list[BadSample] = []

    def handler(self, exn: Exception) -> bool:
        text = str(exn.args[0]) if getattr(exn, "args", None) else type(exn).__name__
        self.found.append(BadSample(BROKEN_MEMBER, f"{type(exn).__name__}: {text}"[:200]))
        return True

    def drain(self) -> list[BadSample]:
        out, self.found = self.found, []
        return out


def build_train(
    spec: str,
    transform: Callable,
    tokenizer: Callable,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    rank: int,
    world_size: int,
    num_samples: int | None,
    resampled: bool,
    pin_memory: bool,
    upsampling_factors: str | None = None,
) -> WdsTrain:
    weights = None
    if upsampling_factors is not None:
        if not resampled:
            raise ValueError("upsampling factors weight draws with replacement: they need dataset_resampled")
        urls, weights = shard_weights(spec, upsampling_factors)
    else:
        urls = shard_urls(spec)
    num_samples = num_samples or dataset_size(urls)
    if not num_samples:
        raise ValueError(
            f"{spec}: webdataset training needs train_num_samples "
            "(no sizes.json or __len__ next to the shards)"
        )
    if not resampled and len(urls) < max(1, workers) * world_size:
        raise ValueError(
            f"{spec}: {len(urls)} shards cannot feed {max(1, workers)} workers x {world_size} ranks; "
            "use fewer workers, more shards, or dataset_resampled"
        )
    epoch = SharedEpoch()

    def shuffle_samples(src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(_stream_seed(seed, epoch.get(), rank))
        # webdataset's public shuffle stage fixes its rng at construction; we need one per epoch.
        return wds.filters._shuffle(src, _SAMPLE_SHUFFLE_SIZE, _SAMPLE_SHUFFLE_INITIAL, rng)

    recorder = _Recorder()  # one per worker process (each gets its own copy of the pipeline)

    def to_pairs(src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode (our load_rgb, so modes convert as for files) and transform; a bad sample is
        dropped from the stream (the next one takes its place) and recorded."""
        for sample in src:
            problem = _problem(sample)
            if problem is None:
                data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
                try:
                    image = decode_rgb(data)
                except BadImage as e:
                    problem = e.reason
            if problem is not None:
                recorder.found.append(BadSample(problem, _sample_name(sample)))
                continue
            key = zlib.crc32(f"{sample['__url__']}/{sample['__key__']}".encode())
            with seeded_rng(sample_seed(seed, epoch.get(), key)):
                tensor = transform(image)
            yield tensor, tokenizer([sample["txt"].decode("utf-8").strip()])[0]

    def with_bad(src: Iterator) -> Iterator[Batch]:
        for images, tokens in src:
            yield Batch((images, tokens), recorder.drain())

    pipeline = wds.DataPipeline(
        _train_shards(urls, seed, epoch, rank, world_size, resampled, weights),
        wds.tarfile_to_samples(handler=recorder.handler),
        shuffle_samples,
        to_pairs,
        wds.batched(batch_size, partial=False),
        with_bad,
    )
    # As upstream: round up to whole batches per worker, so every rank runs the same count.
    num_workers = max(1, workers)
    worker_batches = math.ceil(math.ceil(num_samples / (batch_size * world_size)) / num_workers)
    pipeline = pipeline.with_epoch(worker_batches)
    num_batches = worker_batches * num_workers
    loader = DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),
        collate_fn=_as_is,  # batch_size=None would convert our Batch into a plain list
    )
    return WdsTrain(loader, num_batches * batch_size * world_size, num_batches, epoch)


def _as_is(batch: Batch) -> Batch:
    return batch


def load_eval(spec: str, max_images: int | None = None
              ) -> tuple[list[bytes], list[list[str]], list[str], list[BadSample]]:
    """Encoded images with their captions and names (url:key), read in shard order, and the
    samples left out (broken tar members, no image, no or an empty caption).

    Samples whose image bytes are identical are one image (per-pair shards repeat an image
    once per caption), so its other captions are not negatives. max_images stops reading
    at the first new image beyond the cap. Images are decoded later (ImageDataset), where an
    undecodable one is counted and left out of the metrics.
    """
    images: list[bytes] = []
    captions: list[list[str]] = []
    names: list[str] = []
    index: dict[bytes, int] = {}
    recorder = _Recorder()
    samples = wds.DataPipeline(wds.SimpleShardList(shard_urls(spec)), wds.tarfile_to_samples(handler=recorder.handler))
    for sample in samples:
        problem = _problem(sample)
        if problem is not None:
            recorder.found.append(BadSample(problem, _sample_name(sample)))
            continue
        data = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        caption = sample["txt"].decode("utf-8").strip()
        digest = hashlib.sha1(data).digest()
        if digest not in index:
            if max_images is not None and len(images) >= max_images:
                break
            index[digest] = len(images)
            images.append(data)
            captions.append([])
            names.append(_sample_name(sample))
        captions[index[digest]].append(caption)
    if not images:
        raise ValueError(f"{spec}: no samples with an image and a txt caption")
    return images, captions, names, recorder.drain()
