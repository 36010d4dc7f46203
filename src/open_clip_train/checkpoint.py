"""Checkpoints in upstream's format (`epoch`, `name`, `state_dict`, `optimizer`, `scaler`)
plus what exact resumption needs: the global `step`, the param-group layout by parameter
name (`param_groups`), and RNG states.

Writes are atomic (temporary file, fsync, rename), so a kill at any moment leaves the previous
checkpoint loadable; `latest` only ever names complete files.

Files in a run's checkpoints/: `epoch_N.pt` (after epoch N and its evaluation), `epoch_latest.pt`
(--save-most-recent) and `step_S.pt` (mid-epoch, at global step S: --save-every-n-steps or a stop
signal; only the newest is kept). Every checkpoint records `epoch` (completed epochs) and
`epoch_step` (optimizer steps done in the epoch after those; 0 at an epoch's end), so `find_latest`
orders them by what they hold, not by name or mtime.
"""
from __future__ import annotations

import logging
import os
import re
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import faults
from .errors import UserError

_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")  # atomic_save's temporary files


def step_name(step: int) -> str:
    return f"step_{step}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        faults.in_save(f, obj.get("step") if isinstance(obj, dict) else None)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> Dict[str, Any]:
    """torch / numpy / python RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of `rng_state` (older checkpoints hold only the torch state)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state.get("numpy")
    if isinstance(np_state, dict):
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state.get("python")
    if isinstance(py_state, dict):
        random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss_next"]))


def list_checkpoints(ckpt_dir: Path) -> Dict[int, Path]:
    out = {}
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = _EPOCH_RE.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return out


def list_step_checkpoints(ckpt_dir: Path) -> Dict[int, Path]:
    out = {}
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return out


def position(path: Path) -> Optional[Tuple[int, int]]:
    """(epoch, step) a checkpoint records, read without loading its tensors (mmap); None when the
    file is not a complete, readable checkpoint. Upstream's hold no step: (epoch, 0)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"]), int(state.get("step", 0))
    except Exception:  # torn, foreign or pickled beyond plain containers: not a resume point
        return None


def find_latest(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint by its recorded (epoch, step); temporary files never count,
    and unreadable ones are skipped with a warning. Ties (epoch_latest.pt and epoch_N.pt of the
    same step hold the same state) go to the epoch_N.pt / step_S.pt file."""
    ckpt_dir = Path(ckpt_dir)
    names = [p for p in ckpt_dir.iterdir() if _EPOCH_RE.match(p.name) or _STEP_RE.match(p.name)
             or p.name == "epoch_latest.pt"] if ckpt_dir.is_dir() else []
    best, best_key = None, None
    for p in sorted(names):  # epoch_latest.pt sorts after epoch_N.pt: ties keep the numbered file
        pos = position(p)
        if pos is None:
            logging.warning(f"skipping {p}: not a complete checkpoint")
            continue
        if best_key is None or pos > best_key:
            best, best_key = p, pos
    return best


def remove_stale_temps(ckpt_dir: Path) -> List[Path]:
    """Delete the temporary files of writes that a kill interrupted (they were never renamed
    into place, so nothing refers to them)."""
    removed = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            if _TMP_RE.match(p.name):
                p.unlink()
                removed.append(p)
    return removed


def load(path: Path, trust: bool = False) -> Dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (`trust=True` allows them: only for
    files you made yourself). Our checkpoints and upstream's hold tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # unpickling refused or a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not trust and "weights_only" in str(e):
            raise UserError(f"checkpoint {path} holds pickled objects beyond tensors and plain containers; "
                            f"refusing to load it ({first})") from None
        raise UserError(f"checkpoint {path} cannot be read: {first}") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} is not a dict of tensors")
    return obj


def strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict
