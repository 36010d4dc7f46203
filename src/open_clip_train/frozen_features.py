"""--frozen-feature-cache DIR: the outputs of a locked image trunk (or whole image tower) and of a
locked text tower, computed once per sample and read back by sample id, so every epoch trains only
the trainable modules (the image head, the other tower, the logit scale) without running, or for
the image side even decoding, the frozen part.

Video runs (--dataset-type msrvtt) cache the image part per frame of each video and the text tower
per caption: video/frozen.py, the subclass `for_run` picks (frames need no --no-augment: video
training never augments them).

Valid while the part stays frozen and its input is deterministic: it needs --no-augment, frozen
modules in eval mode (no --frozen-train-mode) and an objective that does not look at the images
or tokens itself (a live teacher, head alignment). The cache (video/feature_cache.py's format)
records the model, the sha256 of each cached part's weights, the preprocessing, the training
data (annotation file hash and image root) and the dtype; a run whose values differ is refused.
At an unlock of a cached tower that tower goes back to running live, with a log line.

How the model consumes cached rows without other changes: a cached image trunk's forward becomes
the identity (the batch carries its outputs in place of pixels; the head runs as usual), a
cached whole image tower or text tower replaces `encode_image` / `encode_text` by the
normalisation alone. Images of cached towers are not decoded: the dataset gets a decoder that
only re-raises the bad images found during extraction (so bad-sample substitution is unchanged)
and a transform that returns a placeholder.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist_env
from .data.bad_samples import BadImage, Batch
from .data.datasets import PairDataset, load_rgb
from .distill.cache import file_sha256, image_root_of, preprocess_fields
from .errors import UserError
from .freeze.layout import tower_layout
from .video.feature_cache import FeatureCache, FeatureShardWriter, tensors_sha256, write_manifest

EXTRACT_BATCH = 64


def _visual_trunk(model: nn.Module) -> Optional[nn.Module]:
    return getattr(getattr(model, "visual", None), "trunk", None)


def frozen_parts(model: nn.Module) -> Dict[str, str]:
    """The parts whose every parameter is frozen now: {'image': 'visual' or 'visual.trunk',
    'text': 'text'}; a tower with nothing frozen, or only some of its trunk, is left out."""
    parts: Dict[str, str] = {}
    if not any(p.requires_grad for p in model.visual.parameters()):
        parts["image"] = "visual"
    elif _visual_trunk(model) is not None and not any(p.requires_grad for p in _visual_trunk(model).parameters()):
        parts["image"] = "visual.trunk"
    text = set(tower_layout(model)["text"].names)
    if text and not any(p.requires_grad for n, p in model.named_parameters() if n in text):
        parts["text"] = "text"
    return parts


def blockers(cfg, objective) -> List[str]:
    """Why frozen outputs would differ from the live ones (empty: the cache applies)."""
    out = []
    video = cfg.video is not None  # frames always go through the eval transform (video/training.py)
    if not video and not cfg.train.no_augment:
        out.append("training augmentation is on (--no-augment switches it off)")
    if cfg.freeze.frozen_train_mode:
        out.append("--frozen-train-mode keeps frozen modules in train mode")
    if getattr(objective, "capture", None) is not None:
        out.append("the objective reads the image trunk's features (head alignment or a sharing teacher)")
    runner = getattr(objective, "runner", None)
    if runner is not None and type(runner).__name__ != "CachedTeacher":
        out.append("a live teacher runs on the batch's images and tokens (--teacher-cache avoids that)")
    if getattr(objective, "live", None) is not None:
        out.append("a live video teacher runs on the batch's frames and tokens (--teacher-cache avoids that)")
    if not cfg.data.train_data or cfg.data.dataset_type not in (("msrvtt",) if video else ("coco", "csv", "auto")):
        out.append("the training data has no per-sample ids (needs coco, csv or msrvtt data)")
    return out


def _part_weights(model: nn.Module, tower: str, part: str) -> Dict[str, torch.Tensor]:
    if tower == "image":
        module = model.visual if part == "visual" else model.visual.trunk
        return dict(module.state_dict())
    names = set(tower_layout(model)["text"].names)
    return {n: p for n, p in model.named_parameters() if n in names}


def expected_meta(cfg, model: nn.Module, parts: Dict[str, str], dataset: PairDataset, dtype: str) -> Dict[str, Any]:
    return {
        "model": cfg.model.name,
        "parts": dict(parts),
        "weights_sha256": {t: tensors_sha256(_part_weights(model, t, p)) for t, p in parts.items()},
        "precision": cfg.model.precision,
        "preprocess": preprocess_fields(model.visual.preprocess_cfg) if "image" in parts else None,
        "text_tokenizer": cfg.model.text_tokenizer if "text" in parts else None,
        "data": {
            "annotations": str(Path(cfg.data.train_data).resolve()),
            "annotations_sha256": file_sha256(cfg.data.train_data),
            "image_root": image_root_of(dataset.images) if "image" in parts else None,
        },
        "feature_dtype": dtype,
    }


class _Identity:
    """A cached trunk's forward: the batch already holds its outputs."""

    def __call__(self, x, *args, **kwargs):
        return x


class _NormaliseOnly:
    """A cached tower's encode_image / encode_text: the batch holds its un-normalised outputs."""

    def __call__(self, x, normalize: bool = False):
        return F.normalize(x, dim=-1) if normalize else x


class _KnownBadDecoder:
    """Decodes nothing: re-raises the bad images found at extraction, else a 1x1 placeholder."""

    def __init__(self, bad: Dict[str, str]):
        self.bad = bad

    def __call__(self, source) -> Image.Image:
        reason = self.bad.get(source) if isinstance(source, str) else None
        if reason is not None:
            raise BadImage(reason)
        return Image.new("RGB", (1, 1))


def _placeholder(image) -> torch.Tensor:
    return torch.zeros(1)


@torch.no_grad()
def text_rows(model: nn.Module, dataset, rank: int, size: int, device) -> tuple:
    """Every size-th caption's (from `rank`) sentence ids and un-normalised text features; the
    dataset's `captions`, `pair_ids` (column 1: caption id) and `tokenizer` (image or video pairs)."""
    ids = dataset.pair_ids[:, 1].tolist()[rank::size]
    caps = dataset.captions[rank::size]
    rows = [model.encode_text(dataset.tokenizer(caps[s:s + EXTRACT_BATCH]).to(device), normalize=False).float().cpu()
            for s in range(0, len(caps), EXTRACT_BATCH)]
    return ids, torch.cat(rows) if rows else torch.empty(0, 0)


def _image_index(dataset: PairDataset) -> Dict[int, int]:
    """image id -> index into dataset.images (images without captions never appear in a batch)."""
    out = {}
    for k in range(len(dataset.images)):
        lo, hi = int(dataset.offsets[k]), int(dataset.offsets[k + 1])
        if hi > lo:
            out[int(dataset.pair_ids[lo, 0])] = k
    return out


class FrozenFeatures:
    """The cache of one run: `prepare` (compute or reuse), `substitute(batches)` per step,
    `on_unlock(towers)` at an unlock epoch. Image-text here; video/frozen.py overrides the image
    side's hooks (`expected_meta`, `check_covers`, `_image_work`, `_swaps`, `_stop_decoding`,
    `substitute`) for per-frame rows."""

    BAD = "bad_images"  # the manifest's list of [id, reason] found bad while computing

    def __init__(self, directory: str, parts: Dict[str, str]):
        self.directory, self.parts = Path(directory), dict(parts)
        self.cache: Optional[FeatureCache] = None
        self.computed = False
        self._saved: Dict[str, Any] = {}

    # ---------------------------------------------------------------- compute / reuse
    def expected_meta(self, cfg, model: nn.Module, dataset, dtype: str) -> Dict[str, Any]:
        return expected_meta(cfg, model, self.parts, dataset, dtype)

    def check_covers(self, dataset) -> None:
        ids = dataset.pair_ids
        bad = {int(i) for i, _ in self.cache.manifest.get(self.BAD, [])}
        if "image" in self.parts:
            self.cache.check_covers("image", [int(i) for i in ids[:, 0].unique() if int(i) not in bad])
        if "text" in self.parts:
            self.cache.check_covers("text", ids[:, 1].tolist())

    def prepare(self, cfg, model: nn.Module, dataset, world, device) -> None:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        meta = self.expected_meta(cfg, model, dataset, dtype)
        if not (self.directory / "manifest.json").is_file():
            t0 = time.perf_counter()
            self._compute(model, dataset, world, device, meta, dtype, cfg.data.workers)
            self.computed = True
            logging.info(f"frozen-feature cache {self.directory}: computed {self._what()} in "
                         f"{time.perf_counter() - t0:.1f} s")
        try:
            self.cache = FeatureCache(self.directory)
            self.cache.check(meta)
            self.check_covers(dataset)
        except ValueError as e:
            raise UserError(f"--frozen-feature-cache: {e}") from None
        if not self.computed:
            logging.info(f"frozen-feature cache {self.directory}: reusing {self._what()}")

    def _what(self) -> str:
        return " and ".join(f"the {t} tower's {p}" if p != "text" else "the text tower" for t, p in self.parts.items())

    def _image_run(self, model: nn.Module):
        """The cached image part's forward on a batch of images."""
        if self.parts["image"] == "visual.trunk":
            return model.visual.trunk
        return lambda x: model.encode_image(x, normalize=False)

    def _image_work(self, model, dataset: PairDataset, rank: int, size: int, device, workers: int):
        """This rank's image rows {table: (ids, rows)} and its bad images [[id, reason]]."""
        index = _image_index(dataset)
        run = self._image_run(model)
        kept, rows, bad = [], [], []
        todo = sorted(index)[rank::size]
        for s in range(0, len(todo), EXTRACT_BATCH):
            images = []
            for i in todo[s:s + EXTRACT_BATCH]:
                try:
                    images.append(dataset.transform(load_rgb(dataset.images[index[i]])))
                    kept.append(i)
                except BadImage as e:
                    bad.append([i, e.reason])
            if images:
                rows.append(run(torch.stack(images).to(device)).float().cpu())
        return {"image": (kept, torch.cat(rows))}, bad

    @torch.no_grad()
    def _compute(self, model, dataset, world, device, meta, dtype: str, workers: int = 0) -> None:
        """Each rank computes every world_size-th image (video) and caption into its own shard."""
        rank, size = world.rank, world.world_size
        work: Dict[str, Any] = {}
        bad: List[List[Any]] = []
        was_training = model.training
        model.eval()
        if "image" in self.parts:
            image_work, bad = self._image_work(model, dataset, rank, size, device, workers)
            work.update(image_work)
        if "text" in self.parts:
            work["text"] = text_rows(model, dataset, rank, size, device)
        model.train(was_training)
        writer = FeatureShardWriter(self.directory, rank, {t: (len(i), tuple(f.shape[1:])) for t, (i, f) in work.items()},
                                    dtype=dtype)
        for table, (ids, feats) in work.items():
            writer.add(table, ids, feats)
        writer.finish()
        all_bad = dist_env.all_gather_object(bad)
        if world.is_master:
            write_manifest(self.directory, {**meta, self.BAD: [b for part in all_bad for b in part]}, size, dtype)
        dist_env.barrier()

    # ---------------------------------------------------------------- train on the cache
    def _swaps(self, model: nn.Module) -> List[tuple]:
        """(owner, attribute, replacement) of every cached part's forward."""
        out = []
        if self.parts.get("image") == "visual.trunk":
            out.append((model.visual.trunk, "forward", _Identity()))
        elif "image" in self.parts:
            out.append((model, "encode_image", _NormaliseOnly()))
        if "text" in self.parts:
            out.append((model, "encode_text", _NormaliseOnly()))
        return out

    def _install(self, model: nn.Module) -> None:
        for owner, attr, fn in self._swaps(model):
            setattr(owner, attr, fn)

    def _uninstall(self, model: nn.Module) -> None:
        for owner, attr, _ in self._swaps(model):
            owner.__dict__.pop(attr, None)

    @contextmanager
    def live(self, model: nn.Module) -> Iterator[None]:
        """The real forwards meanwhile (evaluation runs on images and tokens)."""
        self._uninstall(model)
        try:
            yield
        finally:
            self._install(model)

    def _stop_decoding(self, dataset: PairDataset) -> Any:
        """Make the dataset skip decoding (bad images still raise); returns what to restore."""
        index = _image_index(dataset)
        bad = {dataset.images[index[int(i)]]: r for i, r in self.cache.manifest.get(self.BAD, []) if int(i) in index}
        saved = (dataset.decode, dataset.transform)
        dataset.decode, dataset.transform = _KnownBadDecoder(bad), _placeholder
        return saved

    def _resume_decoding(self, dataset: PairDataset, saved: Any) -> None:
        dataset.decode, dataset.transform = saved

    def activate(self, model: nn.Module, dataset) -> None:
        """Swap the cached parts' forwards and stop decoding images a cached tower would not use."""
        self._install(model)
        if "image" in self.parts:
            self._saved["dataset"] = self._stop_decoding(dataset)

    def on_unlock(self, towers: Sequence[str], model: nn.Module, dataset) -> bool:
        """Cached towers that now train run live again; True when the images must be decoded again
        (the caller rebuilds its loader: persistent workers hold the old dataset)."""
        reload = False
        for tower in [t for t in towers if t in self.parts]:
            self._uninstall(model)
            self.parts.pop(tower)
            self._install(model)
            if tower == "image":
                self._resume_decoding(dataset, self._saved.pop("dataset"))
                reload = True
            logging.info(f"frozen-feature cache: the {tower} tower unlocks; its frozen outputs are computed live "
                         "from here on")
        return reload

    def _image_rows(self, ids: List[int], dtype: torch.dtype):
        """What the model reads in place of the batch's images (the video side: frame rows and masks)."""
        return self.cache.get("image", ids).to(dtype)

    def substitute(self, batches: List, dtype: Optional[torch.dtype]) -> List:
        """Each (images, tokens, ids) batch with the cached rows in place of what the frozen parts read."""
        out = []
        for b in batches:
            fields = list(b)
            ids = fields[2].numpy()  # the loader's host tensor (numpy() refuses a device tensor)
            if "image" in self.parts:
                fields[0] = self._image_rows(ids[:, 0].tolist(), dtype or torch.float32)
            if "text" in self.parts:
                fields[1] = self.cache.get("text", ids[:, 1].tolist()).to(dtype or torch.float32)
            out.append(Batch(fields, getattr(b, "bad", ())))
        return out

    @property
    def active(self) -> bool:
        return bool(self.parts)


def for_run(cfg, parts: Dict[str, str]) -> FrozenFeatures:
    """The run's cache: image-text, or per frame for --dataset-type msrvtt (video/frozen.py)."""
    if cfg.video is not None:
        from .video.frozen import VideoFrozenFeatures

        return VideoFrozenFeatures(cfg.train.frozen_feature_cache, parts)
    return FrozenFeatures(cfg.train.frozen_feature_cache, parts)


def rebuild_loader(loader: DataLoader) -> DataLoader:
    """The same loader over the same (changed) dataset, with fresh workers."""
    return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, num_workers=loader.num_workers,
                      persistent_workers=loader.persistent_workers, pin_memory=loader.pin_memory,
                      generator=loader.generator, collate_fn=loader.collate_fn)


def notice(parts: Dict[str, str]) -> str:
    what = " and ".join("the text tower" if t == "text" else f"the image tower's {p}" for t, p in parts.items())
    return (f"frozen-feature cache: {what} stay frozen on input without augmentation; --frozen-feature-cache DIR would "
            "compute their outputs once and train the rest on them")
