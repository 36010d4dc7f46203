"""Map-style datasets over parsed sources: (image, caption) pairs for training with a
deterministic substitute for each bad sample (`PairDataset`), unique images for evaluation
(`ImageDataset`), and synthetic data."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .bad_samples import EMPTY_CAPTION, BadImage, BadSample, blank_like, decode_rgb
from .sampler import SharedEpoch, sample_seed, seeded_rng

Tokenizer = Callable[[list[str]], torch.Tensor]
ImageSource = str | bytes  # a file path, or encoded image bytes (webdataset evaluation)


def load_rgb(source: ImageSource | Path) -> Image.Image:
    """Decode any PIL-readable image (grayscale, CMYK, palette, alpha on white, ...) to RGB;
    raises BadImage (with its reason) for a missing, empty, truncated or undecodable one."""
    return decode_rgb(source)


FALLBACK_TRIES = 8  # substitutes drawn for a bad sample before a black image stands in


def _tokenize_all(tokenizer: Tokenizer, texts: list[str], chunk: int = 1024) -> torch.Tensor:
    return torch.cat([tokenizer(texts[i : i + chunk]) for i in range(0, len(texts), chunk)]).long()


@dataclass
class Captioned:
    """Images with their captions and the stable ids a teacher cache is keyed by.

    COCO: the image id and annotation id from the json. CSV/TSV: the image's index in
    first-appearance order and the caption's data row number. Both depend on the file alone
    (not on the world size, the sampler or the epoch)."""

    images: list[str]
    captions: list[list[str]]
    image_ids: list[int]
    caption_ids: list[list[int]]

    def pair_ids(self) -> torch.Tensor:
        """[P, 2] int64 (image id, caption id) of every pair, flattened image by image
        (PairDataset's item order)."""
        counts = torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        image = torch.repeat_interleave(torch.tensor(self.image_ids, dtype=torch.long), counts)
        caption = torch.tensor([i for ids in self.caption_ids for i in ids], dtype=torch.long)
        return torch.stack([image, caption], dim=1)


class PairDataset(Dataset):
    """Every (image, caption) pair, flattened image by image: item i -> (image, tokens), or
    (image, tokens, ids) when `pair_ids` ([P, 2], see Captioned.pair_ids) is given.

    Augmentation is seeded from (seed, epoch, i): reproducible for any world size or
    worker count. `offsets` delimit each image's pairs, for one-caption-per-image epochs.
    """

    def __init__(self, images: Sequence[ImageSource], captions: list[list[str]], transform: Callable,
                 tokenizer: Tokenizer, seed: int, epoch: SharedEpoch, pair_ids: torch.Tensor | None = None) -> None:
        counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
        self.images = images
        self.captions = [c for cs in captions for c in cs]
        self.pair_image = torch.repeat_interleave(torch.arange(len(images)), counts)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.transform, self.tokenizer, self.seed, self.epoch = transform, tokenizer, seed, epoch
        if pair_ids is not None and pair_ids.shape != (len(self.captions), 2):
            raise ValueError(f"pair_ids has shape {tuple(pair_ids.shape)}, expected ({len(self.captions)}, 2)")
        self.pair_ids = pair_ids
        self.decode: Callable[[ImageSource], Image.Image] = load_rgb  # swapped by a frozen-feature cache

    def __len__(self) -> int:
        return len(self.captions)

    def _pair(self, j: int) -> tuple[Image.Image, str]:
        source = self.images[int(self.pair_image[j])]
        if not self.captions[j]:
            raise BadImage(EMPTY_CAPTION)
        return self.decode(source), self.captions[j]

    def __getitem__(self, i: int) -> tuple:
        """(image, tokens[, ids], bad): item i, or for a bad one a substitute drawn from (seed,
        epoch, i) alone, so every layout of ranks and workers substitutes the same; the bad one is
        returned for counting. The ids are those of the pair actually returned (a teacher cache
        must look up the substitute's embeddings)."""
        seed = sample_seed(self.seed, self.epoch.get(), i)
        bad, j, draw = (), i, random.Random(seed)
        for _ in range(1 + FALLBACK_TRIES):
            try:
                image, caption = self._pair(j)
                break
            except BadImage as e:
                if not bad:
                    bad = (BadSample(e.reason, _name(self.images[int(self.pair_image[i])]), i),)
                j = draw.randrange(len(self))
        else:
            image, caption = None, self.captions[i]
        with seeded_rng(seed):
            tensor = blank_like(self.transform, _transform_size(self.transform)) if image is None \
                else self.transform(image)
        tokens = self.tokenizer([caption])[0]
        if self.pair_ids is None:
            return tensor, tokens, bad
        return tensor, tokens, self.pair_ids[j if image is not None else i], bad


def _name(source: ImageSource, index: int = -1) -> str:
    return f"image #{index} ({len(source)} bytes)" if isinstance(source, bytes) else str(source)


class ImageDataset(Dataset):
    """Unique evaluation images: item i -> (image, i, bad). A bad image is a black stand-in
    with its BadSample in `bad`, so that evaluation can leave it out; `collate` batches them."""

    def __init__(self, images: Sequence[ImageSource], transform: Callable,
                 names: Sequence[str] | None = None) -> None:
        self.images, self.transform, self.names = images, transform, names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, tuple[BadSample, ...]]:
        try:
            return self.transform(load_rgb(self.images[i])), i, ()
        except BadImage as e:
            name = self.names[i] if self.names is not None else _name(self.images[i], i)
            return blank_like(self.transform, _transform_size(self.transform)), i, (BadSample(e.reason, name, i),)


class SyntheticDataset(Dataset):
    """Random noise images with random word captions, deterministic per item (benchmarks)."""

    WORDS = ("a", "photo", "of", "red", "blue", "small", "large", "dog", "cat", "car", "tree", "house")

    def __init__(self, size: int, image_size: int, transform: Callable, tokenizer: Tokenizer, seed: int,
                 epoch: SharedEpoch) -> None:
        self.size, self.image_size = size, image_size
        self.transform, self.tokenizer, self.seed, self.epoch = transform, tokenizer, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, 0, i))
        pixels = torch.randint(0, 256, (self.image_size, self.image_size, 3), dtype=torch.uint8, generator=g)
        words = torch.randint(len(self.WORDS), (8,), generator=g).tolist()
        with seeded_rng(sample_seed(self.seed, self.epoch.get(), i)):
            image = self.transform(Image.fromarray(pixels.numpy()))
        return image, self.tokenizer([" ".join(self.WORDS[w] for w in words)])[0], ()


def _transform_size(transform: Callable, default: int = 224) -> int:
    """The first size a (torchvision Compose) transform resizes/crops to, for synthetic images."""
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(max(size))
    return default
