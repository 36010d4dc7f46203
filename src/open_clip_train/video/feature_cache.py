"""Frozen-encoder feature cache: the outputs of a tower's frozen part, computed once and read
back by id, so later epochs train only the trainable modules (alignment, aggregation).

Valid only while the part stays frozen and its input is deterministic (no augmentation): the
manifest records the part's weights hash (of the tensors themselves, so a resumed run with the
same weights matches) and every input setting; `FeatureCache.check` refuses a run whose
settings differ. Layout, one table per output kind (e.g. "frames": [T, ...] per video_id,
"image": per image id, "text": per caption id):

    manifest.json                      written last (none = unfinished)
    shard_{r}.{table}.npy              [n_r, *row_shape] memory-mapped
    shard_{r}.{table}.ids.npy          [n_r] str or int64 ids

Stored in the computing dtype by default (float32: the cached run equals the live one);
float16 halves the size at the cost of that exactness.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..distill.cache import MANIFEST, _flatten, _short
from ..run_outputs import jsonable as _jsonable

FORMAT = "frozen-feature-cache/1"
DTYPES = ("float32", "float16", "float64", "bfloat16")


def tensors_sha256(part: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's parameters and buffers."""
    named = dict(part.state_dict()) if isinstance(part, nn.Module) else dict(part)
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _ids_array(ids: Sequence[Any]) -> np.ndarray:
    if all(isinstance(i, (int, np.integer)) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    return np.asarray([str(i) for i in ids], dtype=np.str_)


def _key(i: Any) -> Any:
    return int(i) if isinstance(i, (int, np.integer)) else str(i)


def _shard(directory: Path, rank: int, table: str, ids: bool = False) -> Path:
    return directory / f"shard_{rank}.{table}{'.ids' if ids else ''}.npy"


class FeatureShardWriter:
    """One rank's rows; `tables` maps a table name to (rows on this rank, row shape)."""

    def __init__(self, directory: str | Path, rank: int, tables: Mapping[str, Tuple[int, Sequence[int]]],
                 dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"feature cache dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory, self.rank, self.dtype = Path(directory), rank, dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        # bfloat16 has no numpy dtype: stored as its raw 16 bits
        np_dtype = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        self.arrays = {t: np.lib.format.open_memmap(self._tmp(t), mode="w+", dtype=np_dtype, shape=(n, *shape))
                       for t, (n, shape) in tables.items()}
        self.ids: Dict[str, List[Any]] = {t: [] for t in tables}

    def _tmp(self, table: str) -> Path:
        return _shard(self.directory, self.rank, table).with_suffix(".tmp.npy")

    def add(self, table: str, ids: Sequence[Any], values: torch.Tensor) -> None:
        if table not in self.arrays:
            raise ValueError(f"feature cache: unknown table {table!r}; this writer has {sorted(self.arrays)}")
        arr, start, n = self.arrays[table], len(self.ids[table]), len(ids)
        if values.shape[0] != n or tuple(values.shape[1:]) != arr.shape[1:]:
            raise ValueError(f"feature cache table {table}: {n} ids with values {tuple(values.shape)}, rows are "
                             f"{arr.shape[1:]}")
        if start + n > arr.shape[0]:
            raise ValueError(f"feature cache shard {self.rank}: more {table} rows than the {arr.shape[0]} announced")
        v = values.detach().cpu()
        arr[start:start + n] = v.to(torch.bfloat16).view(torch.uint16).numpy() if self.dtype == "bfloat16" \
            else v.to(getattr(torch, self.dtype)).numpy()
        self.ids[table].extend(_key(i) for i in ids)

    def finish(self) -> None:
        for table in list(self.arrays):
            arr = self.arrays.pop(table)
            if len(self.ids[table]) != arr.shape[0]:
                raise RuntimeError(f"feature cache shard {self.rank}: {len(self.ids[table])} of {arr.shape[0]} "
                                   f"{table} rows written")
            arr.flush()
            del arr
            os.replace(self._tmp(table), _shard(self.directory, self.rank, table))
            np.save(_shard(self.directory, self.rank, table, ids=True), _ids_array(self.ids[table]))


def write_manifest(directory: str | Path, meta: Mapping[str, Any], world_size: int, dtype: str) -> Dict[str, Any]:
    """After every rank's `finish`, on one rank. `meta`: what decides the features (the part,
    its weights hash from tensors_sha256, preprocessing, frame sampling, data root, ...)."""
    directory = Path(directory)
    tables: Dict[str, Dict[str, Any]] = {}
    for rank in range(world_size):
        found = sorted(p.name.split(".")[1] for p in directory.glob(f"shard_{rank}.*.ids.npy"))
        if not found:
            raise ValueError(f"feature cache {directory}: shard {rank} has no tables")
        for table in found:
            rows = np.load(_shard(directory, rank, table), mmap_mode="r")
            info = tables.setdefault(table, {"row_shape": list(rows.shape[1:]), "rows": 0})
            if info["row_shape"] != list(rows.shape[1:]):
                raise ValueError(f"feature cache {directory}: shard {rank} {table} rows are {rows.shape[1:]}, "
                                 f"shard 0's {tuple(info['row_shape'])}")
            info["rows"] += int(rows.shape[0])
    manifest = dict(_jsonable(dict(meta)))
    manifest.update({"format": FORMAT, "dtype": dtype, "world_size": world_size, "tables": tables})
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


class FeatureCache:
    """Read a finished cache: `check(expected)`, `check_covers(table, ids)`, `get(table, ids)`."""

    def __init__(self, directory: str | Path):
        self.directory = d = Path(directory)
        if not (d / MANIFEST).is_file():
            raise ValueError(f"feature cache {d}: no {MANIFEST} (not a cache, or it was not finished)")
        self.manifest: Dict[str, Any] = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"feature cache {d}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.rows: Dict[str, List[np.ndarray]] = {}
        self.index: Dict[str, Dict[Any, Tuple[int, int]]] = {}
        for table in self.manifest["tables"]:
            self.rows[table], self.index[table] = [], {}
            for rank in range(self.manifest["world_size"]):
                try:
                    rows = np.load(_shard(d, rank, table), mmap_mode="r")
                    ids = np.load(_shard(d, rank, table, ids=True)).tolist()
                except FileNotFoundError as e:
                    raise ValueError(f"feature cache {d}: missing shard file {Path(e.filename).name}") from None
                for row, key in enumerate(ids):
                    if key in self.index[table]:
                        raise ValueError(f"feature cache {d}: {table} id {key} appears in more than one row")
                    self.index[table][key] = (rank, row)
                self.rows[table].append(rows)

    def check(self, expected: Mapping[str, Any]) -> None:
        """ValueError (one line) naming the first manifest field that differs from `expected`."""
        have = _flatten(self.manifest)
        for field, want in _flatten(_jsonable(dict(expected))).items():
            if want is None:
                continue
            if field not in have:
                raise ValueError(f"feature cache {self.directory}: the manifest has no field {field}")
            if have[field] != want:
                raise ValueError(f"feature cache {self.directory}: {field} is {_short(have[field])} in the cache but "
                                 f"{_short(want)} for this run; delete the directory or point "
                                 "--frozen-feature-cache elsewhere")

    def check_covers(self, table: str, ids: Sequence[Any], what: str = "the training set") -> None:
        if table not in self.index:
            raise ValueError(f"feature cache {self.directory}: no table {table!r} (has {sorted(self.index)})")
        unique = sorted({_key(i) for i in ids}, key=str)
        missing = [i for i in unique if i not in self.index[table]]
        if missing:
            examples = ", ".join(str(i) for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ValueError(f"feature cache {self.directory}: {len(missing)} of {len(unique)} {table} ids of {what} "
                             f"are not in the cache (ids {examples})")

    def get(self, table: str, ids: Sequence[Any], device: str | torch.device = "cpu") -> torch.Tensor:
        """[len(ids), *row_shape] in the stored dtype, in the order of `ids` (repeats allowed)."""
        self.check_covers(table, ids, "this batch")
        shards = self.rows[table]
        out = np.empty((len(ids), *shards[0].shape[1:]), dtype=shards[0].dtype)
        for k, i in enumerate(ids):
            s, r = self.index[table][_key(i)]
            out[k] = shards[s][r]
        t = torch.from_numpy(out)
        if self.manifest["dtype"] == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.to(device)
