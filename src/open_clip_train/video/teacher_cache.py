"""Video teacher features computed once and read back per training step (sibling of the image
cache in open_clip_train.distill.cache: same manifest-last rule, shards per rank, id lookup).

The B x B teacher similarity depends on which samples share a batch, so the cache holds the
features (what the teacher's encoders give, per video and per caption) and the head's few
tensors; `CachedVideoTeacher` reruns the head on each batch.

    manifest.json                   provenance and shapes (written last: none = unfinished)
    head.npz                        the similarity head's tensors (logit scale; X-CLIP's matrices)
    shard_{r}.frames.npy            [n_r, T, D] normalised per-frame features (fp16 by default)
    shard_{r}.video.npy             [n_r, D] normalised video features
    shard_{r}.frame_mask.npy        [n_r, T] bool
    shard_{r}.video_ids.npy         [n_r] str (MSR-VTT "video123")
    shard_{r}.sentence.npy          [m_r, D] normalised sentence features
    shard_{r}.words.npy             [m_r, W, D] per-token features (optional: most of the size)
    shard_{r}.sen_ids.npy           [m_r] int64

Several teachers are several cache directories.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..distill.cache import MANIFEST, _flatten, _short, file_sha256
from ..run_outputs import jsonable as _jsonable
from .teacher import TeacherFeatures, TextFeatures, VideoFeatures, VideoTeacher, head_similarity, \
    sentence_frame_relevance

FORMAT = "video-teacher-cache/1"
HEAD = "head.npz"
DTYPES = ("float16", "float32")
_VIDEO_ARRAYS = ("frames", "video", "frame_mask")
_TEXT_ARRAYS = ("sentence", "words")


def shard_path(directory: str | Path, rank: int, what: str) -> Path:
    return Path(directory) / f"shard_{rank}.{what}.npy"


def manifest_meta(teacher: VideoTeacher, *, frame_sampling: Mapping[str, Any], max_frames: int, max_words: int,
                  image_size: int | Sequence[int], data_root: str | Path,
                  annotations: Optional[str | Path] = None) -> Dict[str, Any]:
    """The provenance a run compares against: the teacher (kind, model, weights and their
    sha256), frame sampling (e.g. {"fps": 1, "slice": "uniform"}), max frames/words, image size
    and the data it was computed from."""
    t = dict(teacher.meta())
    weights = t.get("weights")
    t["weights"] = str(Path(weights).resolve()) if weights else None
    t["weights_sha256"] = file_sha256(weights) if weights else None
    return _jsonable({
        "teacher": t,
        "data": {"root": str(Path(data_root).resolve()),
                 "annotations": str(Path(annotations).resolve()) if annotations else None,
                 "annotations_sha256": file_sha256(annotations) if annotations else None},
        "frames": {"sampling": dict(frame_sampling), "max_frames": int(max_frames),
                   "image_size": list(image_size) if not isinstance(image_size, int) else [image_size, image_size]},
        "text": {"max_words": int(max_words)},
    })


class VideoShardWriter:
    """One rank's shard: rows go straight into memory-mapped .npy files under temporary names
    until `finish` (a crashed extraction never leaves a shard that looks complete)."""

    def __init__(self, directory: str | Path, rank: int, *, n_videos: int, n_captions: int, max_frames: int,
                 dim: int, words: Optional[int] = None, dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory, self.rank = Path(directory), rank
        self.directory.mkdir(parents=True, exist_ok=True)
        dt = np.dtype(dtype)
        shapes = {"frames": ((n_videos, max_frames, dim), dt), "video": ((n_videos, dim), dt),
                  "frame_mask": ((n_videos, max_frames), np.bool_), "sentence": ((n_captions, dim), dt)}
        if words:
            shapes["words"] = ((n_captions, words, dim), dt)
        self.arrays = {k: np.lib.format.open_memmap(self._tmp(k), mode="w+", dtype=d, shape=s)
                       for k, (s, d) in shapes.items()}
        self.video_ids: List[str] = []
        self.sen_ids: List[int] = []
        self.sizes = {"video": n_videos, "text": n_captions}

    def _tmp(self, what: str) -> Path:
        return shard_path(self.directory, self.rank, what).with_suffix(".tmp.npy")

    def _put(self, names: Iterable[str], start: int, values: Mapping[str, torch.Tensor], kind: str, n: int) -> None:
        if start + n > self.sizes[kind]:
            raise ValueError(f"shard {self.rank}: more {kind} rows than the {self.sizes[kind]} announced")
        for name in names:
            if name in self.arrays:
                v = values[name]
                if v is None:
                    raise ValueError(f"shard {self.rank}: this cache stores {name} but the teacher gave none")
                self.arrays[name][start:start + n] = v.detach().cpu().numpy()

    def add_videos(self, video_ids: Sequence[str], feats: VideoFeatures) -> None:
        n = len(video_ids)
        if feats.video.shape[0] != n:
            raise ValueError(f"{n} video ids but {feats.video.shape[0]} videos")
        self._put(_VIDEO_ARRAYS, len(self.video_ids),
                  {"frames": feats.frames, "video": feats.video, "frame_mask": feats.mask.bool()}, "video", n)
        self.video_ids.extend(str(v) for v in video_ids)

    def add_captions(self, sen_ids: Sequence[int], feats: TextFeatures) -> None:
        n = len(sen_ids)
        if feats.sentence.shape[0] != n:
            raise ValueError(f"{n} caption ids but {feats.sentence.shape[0]} captions")
        self._put(_TEXT_ARRAYS, len(self.sen_ids), {"sentence": feats.sentence, "words": feats.words}, "text", n)
        self.sen_ids.extend(int(s) for s in sen_ids)

    def finish(self) -> None:
        if len(self.video_ids) != self.sizes["video"] or len(self.sen_ids) != self.sizes["text"]:
            raise RuntimeError(f"shard {self.rank}: {len(self.video_ids)} of {self.sizes['video']} videos and "
                               f"{len(self.sen_ids)} of {self.sizes['text']} captions written")
        for name in list(self.arrays):
            self.arrays[name].flush()
            del self.arrays[name]  # close the memmap before renaming
            os.replace(self._tmp(name), shard_path(self.directory, self.rank, name))
        np.save(shard_path(self.directory, self.rank, "video_ids"), np.asarray(self.video_ids, dtype=np.str_))
        np.save(shard_path(self.directory, self.rank, "sen_ids"), np.asarray(self.sen_ids, dtype=np.int64))


def write_manifest(directory: str | Path, meta: Mapping[str, Any], world_size: int,
                   head: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """After every rank's `finish` (a barrier), on one rank: check the shards, store the head,
    write manifest.json last."""
    directory = Path(directory)
    shards, layout = [], None
    for rank in range(world_size):
        arrays = {}
        for name in _VIDEO_ARRAYS + _TEXT_ARRAYS + ("video_ids", "sen_ids"):
            path = shard_path(directory, rank, name)
            if path.is_file():
                arrays[name] = np.load(path, mmap_mode="r")
            elif name != "words":
                raise ValueError(f"video teacher cache {directory}: shard {rank} has no {path.name}")
        this = {"frames": list(arrays["frames"].shape[1:]), "dtype": str(arrays["frames"].dtype),
                "words": list(arrays["words"].shape[1:2]) if "words" in arrays else None}
        if layout is not None and this != layout:
            raise ValueError(f"video teacher cache {directory}: shard {rank} is {this}, shard 0 {layout}")
        layout = this
        shards.append({"rank": rank, "videos": int(len(arrays["video_ids"])), "captions": int(len(arrays["sen_ids"]))})
    np.savez(directory / HEAD, **{k: v.detach().cpu().numpy() for k, v in head.items()})
    manifest = dict(_jsonable(dict(meta)))
    manifest.update({
        "format": FORMAT,
        "features": {"max_frames": layout["frames"][0], "dim": layout["frames"][1], "dtype": layout["dtype"],
                     "words": layout["words"][0] if layout["words"] else None, "normalized": True},
        "shards": shards,
        "counts": {"videos": sum(s["videos"] for s in shards), "captions": sum(s["captions"] for s in shards)},
    })
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def _examples(ids: Sequence[Any]) -> str:
    return ", ".join(str(i) for i in ids[:3]) + (", ..." if len(ids) > 3 else "")


class VideoTeacherCache:
    """Read a cache directory: `check(expected)`, `check_covers(video_ids, sen_ids)`,
    `videos(ids) -> VideoFeatures`, `captions(ids) -> TextFeatures`, `head`."""

    def __init__(self, directory: str | Path):
        self.directory = d = Path(directory)
        path = d / MANIFEST
        if not path.is_file():
            raise ValueError(f"video teacher cache {d}: no {MANIFEST} (not a cache, or its extraction did not finish)")
        try:
            self.manifest: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"video teacher cache {d}: {MANIFEST} is not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"video teacher cache {d}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.has_words = self.manifest["features"]["words"] is not None
        self.arrays: Dict[str, List[np.ndarray]] = {k: [] for k in _VIDEO_ARRAYS + _TEXT_ARRAYS}
        self.video_index: Dict[str, Tuple[int, int]] = {}
        self.sen_index: Dict[int, Tuple[int, int]] = {}
        for entry in self.manifest["shards"]:
            self._open_shard(entry)
        with np.load(d / HEAD) as head:
            self.head = {k: torch.from_numpy(head[k]) for k in head.files}

    def _open_shard(self, entry: Mapping[str, Any]) -> None:
        d, rank = self.directory, entry["rank"]
        try:
            for name in _VIDEO_ARRAYS + _TEXT_ARRAYS:
                if name != "words" or self.has_words:
                    self.arrays[name].append(np.load(shard_path(d, rank, name), mmap_mode="r"))
            video_ids = np.load(shard_path(d, rank, "video_ids"))
            sen_ids = np.load(shard_path(d, rank, "sen_ids"))
        except FileNotFoundError as e:
            raise ValueError(f"video teacher cache {d}: missing shard file {Path(e.filename).name}") from None
        if len(video_ids) != entry["videos"] or len(sen_ids) != entry["captions"]:
            raise ValueError(f"video teacher cache {d}: shard {rank} has {len(video_ids)} videos / {len(sen_ids)} "
                             f"captions, the manifest says {entry['videos']} / {entry['captions']}")
        for index, ids, what in ((self.video_index, video_ids.tolist(), "video"),
                                 (self.sen_index, sen_ids.tolist(), "sen_id")):
            for row, key in enumerate(ids):
                if key in index:
                    raise ValueError(f"video teacher cache {d}: {what} {key} appears in more than one row")
                index[key] = (rank, row)

    @property
    def kind(self) -> str:
        return self.manifest["teacher"]["kind"]

    def check(self, expected: Mapping[str, Any]) -> None:
        """ValueError (one line) naming the first manifest field that differs from `expected`
        (dotted or nested fields, e.g. manifest_meta of this run; None = not checked)."""
        have = _flatten(self.manifest)
        for field, want in _flatten(_jsonable(dict(expected))).items():
            if want is None:
                continue
            if field not in have:
                raise ValueError(f"video teacher cache {self.directory}: the manifest has no field {field}")
            if have[field] != want:
                raise ValueError(f"video teacher cache {self.directory}: {field} is {_short(have[field])} in the "
                                 f"cache but {_short(want)} for this run; extract the cache again for these settings")

    def check_covers(self, video_ids: Iterable[Any], sen_ids: Iterable[Any], what: str = "the training set") -> None:
        """ValueError (one line) when any video or caption id is not in the cache."""
        gaps = []
        for ids, index, noun, conv in ((video_ids, self.video_index, "videos", str),
                                       (sen_ids, self.sen_index, "captions", int)):
            unique = sorted({conv(i) for i in ids})
            missing = [i for i in unique if i not in index]
            if missing:
                gaps.append(f"{len(missing)} of {len(unique)} {noun} (ids {_examples(missing)})")
        if gaps:
            raise ValueError(f"video teacher cache {self.directory}: {' and '.join(gaps)} of {what} are not in the "
                             "cache; extract it from this training set")

    def _rows(self, names: Sequence[str], index: Mapping[Any, Tuple[int, int]], ids: List[Any]) -> Dict[str, np.ndarray]:
        self.check_covers(ids if index is self.video_index else [],
                          ids if index is self.sen_index else [], "this batch")
        where = [index[i] for i in ids]
        out = {}
        for name in names:
            shards = self.arrays[name]
            first = shards[0]
            dtype = np.bool_ if first.dtype == np.bool_ else np.float32
            buf = np.empty((len(ids),) + first.shape[1:], dtype=dtype)
            for k, (s, r) in enumerate(where):
                buf[k] = shards[s][r]
            out[name] = buf
        return out

    def videos(self, video_ids: Sequence[Any], device: str | torch.device = "cpu") -> VideoFeatures:
        rows = self._rows(_VIDEO_ARRAYS, self.video_index, [str(v) for v in video_ids])
        t = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
        return VideoFeatures(t["frames"], t["video"], t["frame_mask"])

    def captions(self, sen_ids: Sequence[Any], device: str | torch.device = "cpu") -> TextFeatures:
        names = _TEXT_ARRAYS if self.has_words else ("sentence",)
        rows = self._rows(names, self.sen_index, [int(s) for s in sen_ids])
        t = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
        return TextFeatures(t["sentence"], t.get("words"))


class CachedVideoTeacher:
    """A teacher that reads features by id and reruns only the similarity head per batch.

    `features(video_ids, sen_ids)` -> TeacherFeatures; `similarity` / `relevance` as a live
    VideoTeacher; `targets(video_ids, sen_ids)` -> ([B, B] logits, [B, T] relevance) for
    VideoDistillLoss."""

    def __init__(self, cache: VideoTeacherCache, device: str | torch.device = "cpu"):
        if cache.kind == "xclip" and not cache.has_words:
            raise ValueError(f"video teacher cache {cache.directory}: an X-CLIP teacher's similarity needs word "
                             "features, and this cache was extracted without them")
        self.cache, self.device = cache, torch.device(device)
        self.head = {k: v.to(self.device) for k, v in cache.head.items()}

    def features(self, video_ids: Sequence[Any], sen_ids: Sequence[Any]) -> TeacherFeatures:
        return TeacherFeatures(self.cache.videos(video_ids, self.device), self.cache.captions(sen_ids, self.device))

    def similarity(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        return head_similarity(self.cache.kind, self.head, video, text)

    def relevance(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        return sentence_frame_relevance(video, text)

    def targets(self, video_ids: Sequence[Any], sen_ids: Sequence[Any]) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.features(video_ids, sen_ids)
        return self.similarity(f.video, f.text), self.relevance(f.video, f.text)


def live_targets(teacher: VideoTeacher, frames: torch.Tensor, mask: torch.Tensor,
                 tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same ([B, B] logits, [B, T] relevance) from a live teacher."""
    f = teacher.encode(frames, mask, tokens)
    return teacher.similarity(f.video, f.text), teacher.relevance(f.video, f.text)
