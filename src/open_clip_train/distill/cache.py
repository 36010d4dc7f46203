"""Teacher embeddings computed once (extract_teacher.py) and read back per training step.

Layout of a cache directory:

    manifest.json                 what was computed, from what (written last: no manifest = unfinished)
    shard_{r}.image.npy           [n_r, D_image] embeddings (normalised), memory-mapped when read
    shard_{r}.image_ids.npy       [n_r] int64 image ids of those rows (COCO image ids; CSV image index)
    shard_{r}.text.npy            [m_r, D_text]
    shard_{r}.ann_ids.npy         [m_r] int64 caption ids (COCO annotation ids; CSV row numbers)

One shard per extraction rank; a reader merges them by id. The manifest records the teacher
(model name, sha256 of its weights file, logit scale), the dataset (annotation file path and
sha256), the teacher's preprocessing and the embedding dims/dtype; `TeacherCache.check` compares
what a run expects field by field.

The cached teacher saw each image once, un-augmented (its eval transform): with random
training augmentation the student sees another crop than the one the teacher embedded
(`augmentation_notice`).

Training reads it through `CachedTeacher`, a teacher source with TeacherRunner's call signature
that looks the batch's (image id, caption id) rows up instead of running a model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..run_outputs import jsonable
from .sharing import PREPROCESS_FIELDS

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_KINDS = ("image", "text")
_ID_FILE = {"image": "image_ids", "text": "ann_ids"}
DTYPES = ("float32", "float16")


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def image_root_of(images: Sequence[Any]) -> Optional[str]:
    """The directory the training images come from (the deepest one holding them all), recorded in
    cache manifests so that a cache of other images under the same ids is refused."""
    dirs = [os.path.dirname(os.path.abspath(p)) for p in images if isinstance(p, (str, Path))]
    return os.path.commonpath(dirs) if dirs else None


def preprocess_fields(preprocess_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The preprocessing that decides what the teacher saw, JSON-normalised (tuples -> lists)."""
    size = preprocess_cfg.get("size")
    if isinstance(size, int):
        size = (size, size)
    out = {k: preprocess_cfg.get(k) for k in PREPROCESS_FIELDS}
    out["size"] = size
    return jsonable(out)


def shard_path(directory: str | Path, rank: int, what: str) -> Path:
    """what: 'image', 'image_ids', 'text' or 'ann_ids'."""
    return Path(directory) / f"shard_{rank}.{what}.npy"


class ShardWriter:
    """Writes one rank's shard; rows go straight to memory-mapped .npy files (temporary names
    until `finish`, so a crashed extraction never leaves a shard that looks complete)."""

    def __init__(self, directory: str | Path, rank: int, n_images: int, n_texts: int,
                 image_dim: int, text_dim: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory, self.rank = Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sizes = {"image": n_images, "text": n_texts}
        self.filled = {"image": 0, "text": 0}
        self.emb = {
            kind: np.lib.format.open_memmap(self._tmp(kind), mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
            for kind, n, dim in (("image", n_images, image_dim), ("text", n_texts, text_dim))
        }
        self.ids = {kind: np.empty(n, dtype=np.int64) for kind, n in self.sizes.items()}

    def _tmp(self, what: str) -> Path:
        return shard_path(self.directory, self.rank, what).with_suffix(".tmp.npy")

    def _add(self, kind: str, ids: Sequence[int] | np.ndarray | torch.Tensor, emb: torch.Tensor | np.ndarray) -> None:
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        emb = emb.detach().float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
        start, n = self.filled[kind], len(ids)
        if emb.shape[0] != n:
            raise ValueError(f"{n} ids but {emb.shape[0]} {kind} embeddings")
        if start + n > self.sizes[kind]:
            raise ValueError(f"shard {self.rank}: more {kind} rows than the {self.sizes[kind]} announced")
        self.emb[kind][start:start + n] = emb
        self.ids[kind][start:start + n] = ids
        self.filled[kind] = start + n

    def add_images(self, image_ids, embeddings) -> None:
        self._add("image", image_ids, embeddings)

    def add_texts(self, ann_ids, embeddings) -> None:
        self._add("text", ann_ids, embeddings)

    def finish(self) -> None:
        for kind in _KINDS:
            if self.filled[kind] != self.sizes[kind]:
                raise RuntimeError(f"shard {self.rank}: {self.filled[kind]} of {self.sizes[kind]} {kind} rows written")
            self.emb[kind].flush()
            del self.emb[kind]  # close the memmap before renaming (needed on Windows)
            os.replace(self._tmp(kind), shard_path(self.directory, self.rank, kind))
            np.save(shard_path(self.directory, self.rank, _ID_FILE[kind]), self.ids[kind])


def write_manifest(directory: str | Path, meta: Mapping[str, Any], world_size: int) -> Dict[str, Any]:
    """After every rank's ShardWriter.finish (a barrier): check the shards, write manifest.json.

    `meta` holds the 'teacher', 'dataset' and 'preprocess' sections (see manifest_meta)."""
    directory = Path(directory)
    shards, dims = [], {}
    for rank in range(world_size):
        entry: Dict[str, Any] = {"rank": rank}
        for kind in _KINDS:
            emb_path, ids_path = shard_path(directory, rank, kind), shard_path(directory, rank, _ID_FILE[kind])
            if not emb_path.is_file() or not ids_path.is_file():
                raise ValueError(f"teacher cache {directory}: shard {rank} has no {emb_path.name}/{ids_path.name}")
            emb = np.load(emb_path, mmap_mode="r")
            ids = np.load(ids_path, mmap_mode="r")
            if emb.ndim != 2 or emb.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"teacher cache {directory}: {emb_path.name} has shape {emb.shape} for {ids.shape[0]} ids")
            if dims.setdefault(kind, (emb.shape[1], str(emb.dtype))) != (emb.shape[1], str(emb.dtype)):
                raise ValueError(f"teacher cache {directory}: shard {rank} {kind} embeddings are {emb.shape[1]}-d "
                                 f"{emb.dtype}, shard 0's {dims[kind]}")
            entry[f"{kind}s"] = int(emb.shape[0])
        shards.append(entry)
    manifest = dict(jsonable(dict(meta)))
    manifest.update({
        "format": FORMAT_VERSION,
        "embedding": {"image_dim": dims["image"][0], "text_dim": dims["text"][0], "dtype": dims["image"][1],
                      "normalized": True},
        "shards": shards,
        "counts": {"images": sum(s["images"] for s in shards), "texts": sum(s["texts"] for s in shards)},
    })
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def manifest_meta(
        *,
        teacher_model: str,
        weights_path: Optional[str],
        logit_scale: float,
        precision: str,
        annotations: str | Path,
        image_root: Optional[str | Path],
        preprocess_cfg: Mapping[str, Any],
        dataset_type: str = "coco",
        columns: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """The manifest's provenance sections for an extraction (`columns`: a CSV's image and
    caption columns, which decide what its rows mean)."""
    meta = {
        "teacher": {
            "model": teacher_model,
            "weights": str(Path(weights_path).resolve()) if weights_path else None,
            "weights_sha256": file_sha256(weights_path) if weights_path else None,
            "logit_scale": float(logit_scale),
            "precision": precision,
        },
        "dataset": {
            "type": dataset_type,
            "annotations": str(Path(annotations).resolve()),
            "annotations_sha256": file_sha256(annotations),
            "image_root": str(Path(image_root).resolve()) if image_root else None,
        },
        "preprocess": preprocess_fields(preprocess_cfg),
    }
    if columns is not None:
        meta["dataset"]["columns"] = list(columns)
    return meta


def expected_fields(
        *,
        teacher_model: Optional[str] = None,
        teacher_pretrained: Optional[str] = None,
        annotations: Optional[str | Path] = None,
        preprocess_cfg: Optional[Mapping[str, Any]] = None,
        dataset_type: Optional[str] = None,
        columns: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """What a training run expects of a cache, for TeacherCache.check; fields left None are not
    checked. With teacher_model and no preprocess_cfg, the teacher's preprocessing comes from its
    config (built on the meta device: no weights, no memory)."""
    out: Dict[str, Any] = {}
    if dataset_type:
        out["dataset.type"] = dataset_type
    if teacher_model:
        out["teacher.model"] = teacher_model
        if preprocess_cfg is None:
            from ..models import create_model
            preprocess_cfg = create_model(teacher_model, device="meta")[0].visual.preprocess_cfg
    if teacher_pretrained:
        out["teacher.weights_sha256"] = file_sha256(teacher_pretrained)
    if annotations:
        out["dataset.annotations_sha256"] = file_sha256(annotations)
    if columns is not None:
        out["dataset.columns"] = list(columns)
    if preprocess_cfg is not None:
        out.update({f"preprocess.{k}": v for k, v in preprocess_fields(preprocess_cfg).items()})
    return out


def augmentation_notice(student_augmented: bool) -> Optional[str]:
    """The line a trainer logs at start when distilling from a cache under random augmentation."""
    if not student_augmented:
        return None
    return ("teacher cache: the teacher embedded each image once, un-augmented (its eval transform); "
            "with random training augmentation the student sees other crops than the teacher did "
            "(use --no-augment, or a live teacher, for identical views)")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class _Index:
    """Sorted ids of one kind over all shards -> (shard, row)."""

    def __init__(self, ids_per_shard: List[np.ndarray], what: str, directory: Path):
        ids = np.concatenate(ids_per_shard) if ids_per_shard else np.empty(0, np.int64)
        shard = np.concatenate([np.full(len(a), s, np.int32) for s, a in enumerate(ids_per_shard)]) \
            if ids_per_shard else np.empty(0, np.int32)
        row = np.concatenate([np.arange(len(a)) for a in ids_per_shard]) if ids_per_shard else np.empty(0, np.int64)
        order = np.argsort(ids, kind="stable")
        self.ids, self.shard, self.row = ids[order], shard[order], row[order]
        dup = np.flatnonzero(self.ids[1:] == self.ids[:-1])
        if dup.size:
            raise ValueError(
                f"teacher cache {directory}: {what} id {int(self.ids[dup[0]])} appears in more than one row")

    def find(self, query: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, shard, row) for each query id."""
        if not len(self.ids):
            zeros = np.zeros(len(query), np.int64)
            return np.zeros(len(query), bool), zeros, zeros
        pos = np.minimum(np.searchsorted(self.ids, query), len(self.ids) - 1)
        return self.ids[pos] == query, self.shard[pos], self.row[pos]


class TeacherCache:
    """Read a cache directory: `check(expected)`, `lookup(image_ids, ann_ids)`, `teacher_outputs`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(
                f"teacher cache {self.directory}: no {MANIFEST} (not a cache, or its extraction did not finish)")
        try:
            self.manifest: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher cache {self.directory}: {MANIFEST} is not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"teacher cache {self.directory}: format {self.manifest.get('format')!r}, "
                             f"this reader understands {FORMAT_VERSION}")
        self.emb: Dict[str, List[np.ndarray]] = {k: [] for k in _KINDS}
        ids: Dict[str, List[np.ndarray]] = {k: [] for k in _KINDS}
        for entry in self.manifest["shards"]:
            rank = entry["rank"]
            for kind in _KINDS:
                try:
                    emb = np.load(shard_path(self.directory, rank, kind), mmap_mode="r")
                    kind_ids = np.load(shard_path(self.directory, rank, _ID_FILE[kind]))
                except FileNotFoundError as e:
                    raise ValueError(
                        f"teacher cache {self.directory}: missing shard file {Path(e.filename).name}") from None
                if emb.shape[0] != entry[f"{kind}s"] or kind_ids.shape[0] != emb.shape[0]:
                    raise ValueError(f"teacher cache {self.directory}: shard {rank} {kind} has {emb.shape[0]} rows, "
                                     f"the manifest says {entry[f'{kind}s']}")
                self.emb[kind].append(emb)
                ids[kind].append(kind_ids.astype(np.int64, copy=False))
        self.index = {kind: _Index(ids[kind], kind, self.directory) for kind in _KINDS}

    # ------------------------------------------------------------------ provenance
    @property
    def logit_scale(self) -> float:
        return float(self.manifest["teacher"]["logit_scale"])

    @property
    def dims(self) -> Tuple[int, int]:
        e = self.manifest["embedding"]
        return int(e["image_dim"]), int(e["text_dim"])

    def __len__(self) -> int:
        return len(self.index["text"].ids)

    def describe(self) -> str:
        t, d, c = self.manifest["teacher"], self.manifest["dataset"], self.manifest["counts"]
        return (f"teacher cache {self.directory}: {t['model']} on {d['annotations']} "
                f"({c['images']} images, {c['texts']} captions, {self.manifest['embedding']['dtype']})")

    def check(self, expected: Mapping[str, Any]) -> None:
        """Raise ValueError (one line) naming the first field whose cached value differs.

        `expected`: dotted ('teacher.model') or nested ({'teacher': {'model': ..}}) fields; see
        expected_fields. Values compare after JSON normalisation (tuples == lists)."""
        have = _flatten(self.manifest)
        for field, want in _flatten(jsonable(dict(expected))).items():
            if want is None:
                continue
            if field not in have:
                raise ValueError(f"teacher cache {self.directory}: the manifest has no field {field}")
            if have[field] != want:
                raise ValueError(
                    f"teacher cache {self.directory}: {field} is {_short(have[field])} in the cache but "
                    f"{_short(want)} for this run; re-run python -m open_clip_train.extract_teacher"
                )

    def check_covers(self, pair_ids, what: str = "the training set") -> None:
        """Raise ValueError (one line) when any (image id, caption id) row of `pair_ids` ([P, 2])
        is not in the cache: how many images and captions, and a few of their ids."""
        ids = np.asarray(pair_ids.cpu() if isinstance(pair_ids, torch.Tensor) else pair_ids, np.int64).reshape(-1, 2)
        gaps = []
        for col, kind, noun in ((0, "image", "images"), (1, "text", "captions")):
            unique = np.unique(ids[:, col])
            missing = unique[~self.index[kind].find(unique)[0]]
            if missing.size:
                examples = ", ".join(str(int(i)) for i in missing[:3]) + (", ..." if missing.size > 3 else "")
                gaps.append(f"{missing.size} of {unique.size} {noun} (ids {examples})")
        if gaps:
            raise ValueError(f"teacher cache {self.directory}: {' and '.join(gaps)} of {what} are not in the cache; "
                             "re-run python -m open_clip_train.extract_teacher on this training set")

    # ------------------------------------------------------------------ lookup
    def _rows(self, kind: str, query: np.ndarray, found: np.ndarray, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        dim = self.dims[0 if kind == "image" else 1]
        out = np.empty((len(query), dim), dtype=np.float32)
        for s in np.unique(shard[found]) if found.any() else []:
            sel = np.flatnonzero(found & (shard == s))
            out[sel] = self.emb[kind][int(s)][row[sel]]
        return out

    def lookup(self, image_ids, ann_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        """float32 [N, D] embeddings of each image id and each annotation id, in the given order
        (ids may repeat). Raises ValueError when any is not in the cache."""
        q_img = np.asarray(image_ids.cpu() if isinstance(image_ids, torch.Tensor) else image_ids, np.int64).reshape(-1)
        q_txt = np.asarray(ann_ids.cpu() if isinstance(ann_ids, torch.Tensor) else ann_ids, np.int64).reshape(-1)
        f_img, s_img, r_img = self.index["image"].find(q_img)
        f_txt, s_txt, r_txt = self.index["text"].find(q_txt)
        n_img, n_txt = int((~f_img).sum()), int((~f_txt).sum())
        if n_img or n_txt:
            example = (f"image id {int(q_img[~f_img][0])}" if n_img else f"annotation id {int(q_txt[~f_txt][0])}")
            raise ValueError(
                f"teacher cache {self.directory}: {n_img} of {len(q_img)} images and {n_txt} of {len(q_txt)} "
                f"captions are missing (e.g. {example}); was it extracted from this training set?"
            )
        images = self._rows("image", q_img, f_img, s_img, r_img)
        texts = self._rows("text", q_txt, f_txt, s_txt, r_txt)
        return torch.from_numpy(images), torch.from_numpy(texts)

    def teacher_outputs(self, image_ids, ann_ids, device: str | torch.device = "cpu") -> Dict[str, torch.Tensor]:
        """The dict DistillLoss takes as `teacher`, for the batch's ids."""
        images, texts = self.lookup(image_ids, ann_ids)
        return {
            "image_features": images.to(device, non_blocking=True),
            "text_features": texts.to(device, non_blocking=True),
            "logit_scale": torch.tensor(self.logit_scale, device=device),
        }


class CachedTeacher:
    """A teacher source for the objective: `source(images, texts, student_out, trunk_features,
    ids=ids)` (TeacherRunner's signature) returns the cached outputs of the batch's sample ids
    ([N, 2] (image id, caption id), the training data's `with_ids`); images and texts are not
    looked at. Each call reads only the rows of that batch from the memory-mapped shards."""

    reads_student = False  # the objective may call it before the student's forward

    def __init__(self, cache: TeacherCache, device: str | torch.device = "cpu"):
        self.cache, self.device = cache, torch.device(device)
        self.rows_read = 0

    def __call__(self, images=None, texts=None, student_out=None, trunk_features=None, *,
                 ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if ids is None:
            raise ValueError("a cached teacher needs the batch's sample ids (training data built with_ids)")
        ids = ids.reshape(-1, 2)
        self.rows_read += int(ids.shape[0])
        return self.cache.teacher_outputs(ids[:, 0], ids[:, 1], device=self.device)
