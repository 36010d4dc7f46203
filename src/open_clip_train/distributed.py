"""Distributed environment: read it (pure functions), initialise it, tear it down.

Two launchers are understood:

* torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
* `srun` starting one task per GPU (no torchrun) sets SLURM_PROCID / SLURM_LOCALID /
  SLURM_NTASKS / SLURM_JOB_NODELIST / SLURM_NNODES / SLURM_JOB_ID. The rendezvous is the
  first host of the step's (else the job's) node list, expanded here from Slurm's compact form
  (`node[01-03,07]`) without calling scontrol, on MASTER_PORT or 15000 + SLURM_JOB_ID % 10000;
  MASTER_ADDR / MASTER_PORT in the environment override both. `init` exports them for
  `init_process_group(env://)`; `world_from_env` only reads.

torchrun's variables win when both are present (srun starting torchrun once per node).
A half-set environment (RANK without WORLD_SIZE, SLURM_PROCID without SLURM_NTASKS) or a
malformed one is a user error, not a silent single-process run. A world of one process
(`torchrun --nproc_per_node 1`, `srun -n 1`) runs without a process group, as upstream does.
Backend: nccl when the process drives a CUDA device, gloo otherwise, so CPU DDP works
(upstream passes `device_ids` for a CPU module and crashes).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from itertools import product
from typing import List, Mapping, MutableMapping, Optional

import torch
import torch.distributed as dist

from .errors import UserError

_TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT")
_SLURM_TASK_KEYS = ("SLURM_PROCID", "SLURM_LOCALID")  # set by srun for each task it starts
_SLURM_KEYS = (*_SLURM_TASK_KEYS, "SLURM_NTASKS")
# the step's values first: srun sets them for the tasks it starts; the job's cover the rest
_SLURM_NODELIST_KEYS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_SLURM_NNODES_KEYS = ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
SLURM_PORT_BASE = 15000  # default MASTER_PORT under srun: SLURM_PORT_BASE + SLURM_JOB_ID % 10000
DEFAULT_PORT = 29500  # torchrun's default, for a SLURM-like environment without SLURM_JOB_ID

TORCHRUN = "torchrun"
SLURM = "SLURM (srun)"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single process"  # where the values came from: TORCHRUN, SLURM or none
    num_nodes: int = 1
    master_addr: Optional[str] = None  # the rendezvous `init` exports (distributed worlds only)
    master_port: Optional[int] = None

    @property
    def distributed(self) -> bool:
        """More than one process: a process group and a DDP wrapper are needed."""
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def rendezvous(self) -> str:
        return f"{self.master_addr}:{self.master_port}" if self.master_addr else "none"


def _int_var(env: Mapping[str, str], key: str, minimum: int) -> int:
    text = env[key]
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{key}={text!r} in the environment is not an integer") from None
    if value < minimum:
        raise UserError(f"{key}={value} in the environment must be >= {minimum}")
    return value


def _half_set(what: str, keys, env: Mapping[str, str], fix: str) -> None:
    present = [k for k in keys if k in env]
    missing = [k for k in keys if k not in env]
    if missing:
        raise UserError(f"half-set {what} environment: {', '.join(present)} set but {', '.join(missing)} "
                        f"missing; {fix}")


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """Which process this is, from the launcher's environment variables (pure: reads `env` only)."""
    if any(k in env for k in _TORCHRUN_KEYS):
        return _torchrun_world(env)
    if any(k in env for k in _SLURM_TASK_KEYS):
        return _slurm_world(env)
    return World()


def _torchrun_world(env: Mapping[str, str]) -> World:
    _half_set("distributed", _TORCHRUN_KEYS, env, "launch with torchrun or unset these variables")
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
    if world_size == 1:
        return World(rank, local_rank, world_size, TORCHRUN, 1)
    missing = [k for k in _RENDEZVOUS_KEYS if not env.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun")
    return World(rank, local_rank, world_size, TORCHRUN, world_size // local_world,
                 env["MASTER_ADDR"], _int_var(env, "MASTER_PORT", 1))


def _slurm_world(env: Mapping[str, str]) -> World:
    """A task started by `srun` (one per GPU, no torchrun): rank, local rank and world size
    from SLURM_*, the rendezvous from MASTER_ADDR / MASTER_PORT or the node list and job id."""
    _half_set("SLURM", _SLURM_KEYS, env, "start one task per GPU with srun (or launch with torchrun), "
                                         "or unset these variables")
    rank = _int_var(env, "SLURM_PROCID", 0)
    local_rank = _int_var(env, "SLURM_LOCALID", 0)
    world_size = _int_var(env, "SLURM_NTASKS", 1)
    if rank >= world_size:
        raise UserError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world_size}")
    if local_rank > rank:
        raise UserError(f"SLURM_LOCALID={local_rank} is larger than SLURM_PROCID={rank}")
    nodelist_key = next((k for k in _SLURM_NODELIST_KEYS if env.get(k)), None)
    hosts = expand_nodelist(env[nodelist_key]) if nodelist_key else []
    nnodes_key = next((k for k in _SLURM_NNODES_KEYS if env.get(k)), None)
    num_nodes = _int_var(env, nnodes_key, 1) if nnodes_key else max(len(hosts), 1)
    if num_nodes > world_size:
        raise UserError(f"{nnodes_key}={num_nodes} nodes for SLURM_NTASKS={world_size} tasks; "
                        "start at least one task per node")
    if world_size == 1:
        return World(rank, local_rank, world_size, SLURM, num_nodes)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif hosts:
        addr = hosts[0]
    else:
        raise UserError(f"SLURM_NTASKS={world_size} but neither SLURM_JOB_NODELIST nor MASTER_ADDR is set: "
                        "no host for the rendezvous")
    if env.get("MASTER_PORT"):
        port = _int_var(env, "MASTER_PORT", 1)
    elif env.get("SLURM_JOB_ID"):
        port = SLURM_PORT_BASE + _int_var(env, "SLURM_JOB_ID", 0) % 10000
    else:
        port = DEFAULT_PORT
    if port > 65535:
        raise UserError(f"MASTER_PORT={port} in the environment is not a port (1-65535)")
    return World(rank, local_rank, world_size, SLURM, num_nodes, addr, port)


_HOSTLIST_TOKEN = re.compile(r"\[([^\[\]]*)\]|([^\[\],]+)")
_DIGITS = re.compile(r"[0-9]+")


def expand_nodelist(text: str) -> List[str]:
    """Slurm's compact host list -> host names, in order (pure; no scontrol).

    `node[01-03,07]` -> node01 node02 node03 node07 (zero padding kept), `gpu-a[1,3],gpu-b2`
    -> gpu-a1 gpu-a3 gpu-b2; several bracket groups in one name expand as a product
    (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2). Malformed lists are user errors.
    """
    hosts: List[str] = []
    for item in _split_top_level(text):
        parts: List[List[str]] = []
        pos = 0
        while pos < len(item):
            m = _HOSTLIST_TOKEN.match(item, pos)
            if m is None:
                raise UserError(f"host list {text!r}: unbalanced brackets in {item!r}")
            parts.append(_expand_ranges(m.group(1), text) if m.group(1) is not None else [m.group(2)])
            pos = m.end()
        hosts.extend("".join(p) for p in product(*parts))
    return hosts


def _split_top_level(text: str) -> List[str]:
    """Split at commas outside brackets: `a[1,2],b` -> ['a[1,2]', 'b']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise UserError(f"host list {text!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"host list {text!r}: unbalanced brackets")
    items.append(text[start:])
    items = [s.strip() for s in items]
    if not all(items):
        raise UserError(f"host list {text!r}: empty host name")
    return items


def _expand_ranges(spec: str, text: str) -> List[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; a range keeps the width of its first number."""
    out: List[str] = []
    for part in spec.split(","):
        lo, sep, hi = (x.strip() for x in part.partition("-"))
        if not _DIGITS.fullmatch(lo) or (sep and not _DIGITS.fullmatch(hi)):
            raise UserError(f"host list {text!r}: bad range {part!r} in [{spec}]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"host list {text!r}: range {part!r} runs backwards")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return out


def export_rendezvous(world: World, environ: MutableMapping[str, str] = os.environ) -> None:
    """MASTER_ADDR / MASTER_PORT for `init_process_group(init_method="env://")`."""
    if world.master_addr is not None:
        environ["MASTER_ADDR"] = world.master_addr
        environ["MASTER_PORT"] = str(world.master_port)


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
        export_rendezvous(world)  # srun exports no MASTER_*: derived in world_from_env
        store = _restart_store(world)
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://", rank=world.rank,
                                    world_size=world.world_size)
        else:
            dist.init_process_group(backend=backend, store=store, rank=world.rank, world_size=world.world_size)
    return backend


def _restart_store(world: World) -> Optional[dist.Store]:
    """After a torchrun restart, a store whose keys this attempt alone writes.

    torchrun's static rendezvous keeps one TCPStore for all attempts under the same prefix, so
    the restarted group can read the crashed attempt's gloo addresses and fail to connect
    ("Connection refused") before the new peer has overwritten them. Keying by the restart
    count gives every attempt a clean namespace. None: not a restarted torchrun attempt.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size,
                         is_master=False, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"open_clip_train/attempt_{attempt}", base)


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


def all_reduce_max_int(value: int, device: torch.device) -> int:
    """The largest `value` over ranks (identity in a single process); one tiny collective."""
    if not _initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj, src: int = 0):
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in a single process)."""
    if not _initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order ([obj] in a single process)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
