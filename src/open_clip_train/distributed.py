"""Distributed environment: read it (pure functions), initialise it, tear it down.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
A half-set environment (e.g. RANK without WORLD_SIZE) or a malformed one is a user error,
not a silent single-process run. WORLD_SIZE=1 (e.g. `torchrun --nproc_per_node 1`) runs
without a process group, as upstream does. Multi-node SLURM jobs launch torchrun per node.
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
_RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single process"
    num_nodes: int = 1

    @property
    def distributed(self) -> bool:
        """More than one process: a process group and a DDP wrapper are needed."""
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], key: str, minimum: int) -> int:
    text = env[key]
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{key}={text!r} in the environment is not an integer") from None
    if value < minimum:
        raise UserError(f"{key}={value} in the environment must be >= {minimum}")
    return value


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """Which process this is, from the launcher's environment variables (pure: reads `env` only)."""
    present = [k for k in _TORCHRUN_KEYS if k in env]
    if not present:
        return World()
    if len(present) != len(_TORCHRUN_KEYS):
        missing = [k for k in _TORCHRUN_KEYS if k not in env]
        raise UserError(
            f"half-set distributed environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with torchrun or unset these variables"
        )
    rank = _int_var(env, "RANK", 0)
    local_rank = _int_var(env, "LOCAL_RANK", 0)
    world_size = _int_var(env, "WORLD_SIZE", 1)
    if rank >= world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else world_size
    if local_world > world_size or world_size % local_world:
        raise UserError(f"LOCAL_WORLD_SIZE={local_world} does not divide WORLD_SIZE={world_size}")
    if local_rank >= local_world:
        raise UserError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}")
    if world_size > 1:
        missing = [k for k in _RENDEZVOUS_KEYS if not env.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun")
    return World(rank, local_rank, world_size, "torchrun", world_size // local_world)


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
    """Initialise the default process group for a multi-process launch; returns the backend."""
    backend = backend_for(device, backend)
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=world.rank,
                                world_size=world.world_size)
    return backend


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def close() -> None:
    if _initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order; ranks may hold different row counts, zero included."""
    if not _initialized() or dist.get_world_size() == 1:
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


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if not _initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
