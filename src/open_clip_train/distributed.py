"""Distributed environment: read it (pure functions), initialise it, tear it down.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. A half-set
environment (e.g. RANK without WORLD_SIZE) is a user error, not a silent single-process run.
Backend: nccl when the process drives a CUDA device, gloo otherwise, so CPU DDP works
(upstream passes `device_ids` for a CPU module and crashes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .errors import UserError

_TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single process"
    num_nodes: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.source != "single process"

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """Which process this is, from the launcher's environment variables."""
    present = [k for k in _TORCHRUN_KEYS if k in env]
    if not present:
        return World()
    if len(present) != len(_TORCHRUN_KEYS):
        missing = [k for k in _TORCHRUN_KEYS if k not in env]
        raise UserError(
            f"half-set distributed environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with torchrun or unset these variables"
        )
    try:
        rank, local_rank, world_size = (int(env[k]) for k in _TORCHRUN_KEYS)
    except ValueError:
        raise UserError(f"non-integer RANK/LOCAL_RANK/WORLD_SIZE in the environment") from None
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    local_world = int(env.get("LOCAL_WORLD_SIZE", world_size))
    return World(rank, local_rank, world_size, "torchrun", max(1, world_size // max(local_world, 1)))


def pick_device(world: World, want: str = "auto") -> torch.device:
    """cuda:<local_rank> when CUDA is available (and not refused), else cpu."""
    if want != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def backend_for(device: torch.device, requested: Optional[str] = None) -> str:
    if requested and not (requested == "nccl" and device.type != "cuda"):
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init(world: World, device: torch.device, backend: Optional[str] = None) -> str:
    """Initialise the default process group for a distributed launch; returns the backend."""
    backend = backend_for(device, backend)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return backend


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order; ranks may hold different row counts."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
