"""What each rank sees in an epoch, and with which randomness.

Every rank derives the same global order from (seed, epoch) alone and takes its own
slice of each global batch, so the global batches do not depend on the world size:
2 ranks x batch 8 train on exactly the batches 1 rank x batch 16 does. Augmentation is
seeded per sample from (seed, epoch, item), so it does not depend on the world size,
on the number of DataLoader workers, or on how long persistent workers have lived.
"""
from __future__ import annotations

import multiprocessing as mp
import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler, get_worker_info


class SharedEpoch:
    """The current epoch, visible to DataLoader worker processes (persistent ones too)."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.Value("i", epoch)

    def get(self) -> int:
        return int(self._value.value)

    def set(self, epoch: int) -> None:
        self._value.value = epoch


def sample_seed(seed: int, epoch: int, item: int) -> int:
    """A 63-bit seed for one item in one epoch (distinct items and epochs get distinct seeds)."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + item) % (2**63)


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds CUDA, ~100x slower
    random.seed(seed)  # timm's transforms draw from random and numpy
    np.random.seed(seed % (2**32))


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), random and numpy for one sample's augmentation.

    In the training process itself (workers=0) their previous states are restored, so the
    data pipeline does not reset the model's random streams (dropout, ...). Worker
    processes skip that: saving numpy's state costs more than decoding a small image.
    """
    if get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    _seed_all(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def contiguous_shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous block of n items; blocks differ by at most one item and
    together cover every item exactly once (no padding, no duplicates)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler: one global permutation per epoch, cut into global batches.

    Each epoch draws `torch.randperm` from a generator seeded with seed + epoch, cuts it
    into global batches of batch_size * world_size (the incomplete last one is dropped, as
    DDP training with drop_last does), and yields rank r's slice
    [r * batch_size, (r + 1) * batch_size) of each.

    group_offsets (CSR offsets, e.g. caption ranges per image): when given, the epoch's
    population is one item drawn per group from the same generator instead of every item.
    max_samples caps the epoch to the first max_samples items of the permutation.

    start_batch: the next iteration skips its first start_batch batches (mid-epoch
    resume); it is consumed by that iteration, so later epochs are whole again.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        group_offsets: torch.Tensor | None = None,
        max_samples: int | None = None,
        shared_epoch: SharedEpoch | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        contiguous_shard(0, rank, world_size)  # validates rank / world_size
        if group_offsets is not None and (group_offsets.diff() < 1).any():
            raise ValueError("every group needs at least one item")
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.group_offsets = group_offsets
        self.max_samples = max_samples
        self.shared_epoch = shared_epoch or SharedEpoch()
        self.start_batch = 0

    @property
    def epoch(self) -> int:
        return self.shared_epoch.get()

    def set_epoch(self, epoch: int) -> None:
        self.shared_epoch.set(epoch)

    @property
    def epoch_size(self) -> int:
        """Global items per epoch before dropping the incomplete last global batch."""
        n = self.num_items if self.group_offsets is None else len(self.group_offsets) - 1
        return n if self.max_samples is None else min(n, self.max_samples)

    @property
    def num_batches(self) -> int:
        """Batches per rank in a whole epoch."""
        return self.epoch_size // (self.batch_size * self.world_size)

    def global_order(self) -> torch.Tensor:
        """This epoch's global item order, identical on every rank."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_offsets is None:
            order = torch.randperm(self.num_items, generator=g)
        else:
            starts, sizes = self.group_offsets[:-1], self.group_offsets.diff()
            perm = torch.randperm(len(sizes), generator=g)
            picks = starts + (torch.rand(len(sizes), generator=g, dtype=torch.float64) * sizes).long()
            order = picks[perm]
        return order[: self.epoch_size]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        if start < 0:
            raise ValueError(f"start_batch must be >= 0, got {start}")
        order = self.global_order()
        global_batch = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        for b in range(start, self.num_batches):
            base = b * global_batch + lo
            yield order[base : base + self.batch_size].tolist()
