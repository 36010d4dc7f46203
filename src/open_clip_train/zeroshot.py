"""Zero-shot classification during training: ImageNet as upstream, and any labelled ImageFolder.

`--imagenet-val DIR` (an ImageFolder of the 1000 synset folders) and `--imagenet-v2 DIR` (the
matched-frequency set, folders `0`..`999`, as `imagenetv2_pytorch` lays it out) are scored with
open_clip's class names and OpenAI's 80 prompt templates under upstream's keys:

    imagenet-zeroshot-val-top1, imagenet-zeroshot-val-top5,
    imagenetv2-zeroshot-val-top1, imagenetv2-zeroshot-val-top5

`--zeroshot-data DIR` is any ImageFolder (one sub-folder per class, in sorted order), with
`--zeroshot-classnames FILE` (one name per line, in that order; default: the folder names with
`_` read as spaces) and `--zeroshot-templates FILE` (one prompt per line with `{}` where the class
name goes; default: OpenAI's ImageNet templates). Its keys are `zeroshot-<name>-top1` and, when it
has more than 5 classes, `zeroshot-<name>-top5`; `<name>` is `--zeroshot-name` or the folder's
name. Values are fractions in [0, 1], as upstream's.

Frequency as upstream: after epochs that are multiples of `--zeroshot-frequency`, and after the
last one; 0 turns it off. Epoch 0 (before training, with --val-at-start) counts as a multiple.

Distributed: every rank encodes its own slice of the class names (the class embeddings are
gathered) and its own contiguous slice of the images, and the correct-prediction counts are
summed, so each image is encoded once in all and every rank returns the same numbers. Upstream
runs the whole evaluation on every rank.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as dist_env
from .distributed import World
from .precision import autocast, input_dtype

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_CLASSES = 1000
IMAGENET_V2_SUBDIR = "ImageNetV2-matched-frequency"  # imagenetv2_pytorch's folder under its `location`
TOP5_MIN_CLASSES = 6  # with 5 classes or fewer every image is right within 5 guesses
Template = Union[str, Callable[[str], str]]


@dataclass(frozen=True)
class ZeroShotCfg:
    imagenet_val: Optional[str] = None  # --imagenet-val
    imagenet_v2: Optional[str] = None  # --imagenet-v2
    data: Optional[str] = None  # --zeroshot-data: an ImageFolder
    classnames: Optional[str] = None  # --zeroshot-classnames
    templates: Optional[str] = None  # --zeroshot-templates
    name: Optional[str] = None  # --zeroshot-name: the <name> in the data set's keys
    frequency: int = 2  # --zeroshot-frequency
    batch_size: int = 64
    workers: int = 1

    @property
    def enabled(self) -> bool:
        return self.frequency > 0 and any((self.imagenet_val, self.imagenet_v2, self.data))

    def due(self, epoch: int, epochs: int) -> bool:
        """Upstream's rule: `epoch` completed epochs is a multiple of the frequency, or the last."""
        return self.enabled and (epoch % self.frequency == 0 or epoch == epochs)

    @property
    def key_name(self) -> str:
        raw = self.name or Path(str(self.data)).resolve().name
        return re.sub(r"[^A-Za-z0-9_.]+", "-", raw).strip("-").lower() or "data"


# ------------------------------------------------------------------------------------ data sets

@dataclass
class ZeroShotSet:
    """One labelled image set and the prompts that name its classes."""
    key: str  # the prefix of its result keys, e.g. 'imagenet-zeroshot-val'
    samples: List[Tuple[Path, int]]  # (image file, class index)
    classnames: List[str]
    templates: Sequence[Template]
    classifier: str  # sets with the same value share one classifier (ImageNet val and v2)


class _Images(Dataset):
    def __init__(self, samples: List[Tuple[Path, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(root: Path, flag: str) -> List[Path]:
    if not root.is_dir():
        raise ValueError(f"{flag} {root}: no such directory")
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    if not dirs:
        raise ValueError(f"{flag} {root}: no class folders in it (expected one sub-folder per class)")
    return dirs


def _files(d: Path) -> List[Path]:
    return sorted(p for p in d.rglob("*") if _is_image(p))


def image_folder(root: Path, flag: str) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(samples, folder names) of an ImageFolder: classes are the sorted sub-folders."""
    dirs = _class_dirs(root, flag)
    samples = [(p, k) for k, d in enumerate(dirs) for p in _files(d)]
    if not samples:
        raise ValueError(f"{flag} {root}: no images in its class folders ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, [d.name for d in dirs]


def imagenet_v2_folder(root: Path) -> List[Tuple[Path, int]]:
    """ImageNetV2 as imagenetv2_pytorch keeps it (DIR/ImageNetV2-matched-frequency/<class index>/),
    or that folder itself; the label is the folder's number, not its sorted position."""
    flag = "--imagenet-v2"
    base = root / IMAGENET_V2_SUBDIR if (root / IMAGENET_V2_SUBDIR).is_dir() else root
    dirs = _class_dirs(base, flag)
    bad = [d.name for d in dirs if not (d.name.isdigit() and int(d.name) < IMAGENET_CLASSES)]
    if bad:
        raise ValueError(f"{flag} {base}: class folders must be named 0..{IMAGENET_CLASSES - 1} "
                         f"(ImageNetV2's layout), found {bad[:3]}")
    samples = [(p, int(d.name)) for d in dirs for p in _files(d)]
    if not samples:
        raise ValueError(f"{flag} {base}: no images in its class folders")
    return samples


def read_lines(path: str, flag: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{flag} {path}: the file is empty")
    return lines


def read_templates(path: str) -> List[str]:
    templates = read_lines(path, "--zeroshot-templates")
    for t in templates:
        try:
            ok = "{}" in t and t.format("x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"--zeroshot-templates {path}: {t!r} must contain one {{}} where the class name goes "
                             "(and no other braces)")
    return templates


def build_sets(cfg: ZeroShotCfg) -> List[ZeroShotSet]:
    """The sets `cfg` names, listed and checked (no image is read): a missing folder, an empty
    one, or a class count that does not match the names is a ValueError."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    sets = []
    if cfg.imagenet_val:
        samples, folders = image_folder(Path(cfg.imagenet_val), "--imagenet-val")
        if len(folders) != IMAGENET_CLASSES:
            raise ValueError(f"--imagenet-val {cfg.imagenet_val}: {len(folders)} class folders, ImageNet has "
                             f"{IMAGENET_CLASSES} (one per synset)")
        sets.append(ZeroShotSet("imagenet-zeroshot-val", samples, list(IMAGENET_CLASSNAMES), OPENAI_IMAGENET_TEMPLATES,
                                "imagenet"))
    if cfg.imagenet_v2:
        sets.append(ZeroShotSet("imagenetv2-zeroshot-val", imagenet_v2_folder(Path(cfg.imagenet_v2)),
                                list(IMAGENET_CLASSNAMES), OPENAI_IMAGENET_TEMPLATES, "imagenet"))
    if cfg.data:
        samples, folders = image_folder(Path(cfg.data), "--zeroshot-data")
        if cfg.classnames:
            names = read_lines(cfg.classnames, "--zeroshot-classnames")
            if len(names) != len(folders):
                raise ValueError(f"--zeroshot-classnames {cfg.classnames}: {len(names)} names for the "
                                 f"{len(folders)} class folders of {cfg.data}")
        else:
            names = [f.replace("_", " ") for f in folders]
        templates = read_templates(cfg.templates) if cfg.templates else OPENAI_IMAGENET_TEMPLATES
        sets.append(ZeroShotSet(f"zeroshot-{cfg.key_name}", samples, names, templates, "data"))
    elif cfg.classnames or cfg.templates:
        raise ValueError("--zeroshot-classnames / --zeroshot-templates need --zeroshot-data DIR")
    return sets


# ---------------------------------------------------------------------------------- evaluation

def _shard(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous slice of n items (sizes differ by at most one)."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template], world: World,
                     device: torch.device, precision: str) -> torch.Tensor:
    """[D, C] normalised class embeddings (open_clip's template-averaged classifier); each rank
    encodes its slice of the classes and the slices are gathered."""
    from open_clip import build_zero_shot_classifier

    r = _shard(len(classnames), world.rank, world.world_size)
    mine = list(classnames)[r.start:r.stop]
    with autocast(precision, device):
        if mine:
            part = build_zero_shot_classifier(model, tokenizer, mine, templates, num_classes_per_batch=10,
                                              device=device).float().T
        else:  # more ranks than classes: this rank contributes no rows
            probe = build_zero_shot_classifier(model, tokenizer, list(classnames)[:1], templates[:1], device=device)
            part = probe.float().T[:0]
    return dist_env.all_gather_rows(part.contiguous()).T


@torch.no_grad()
def count_correct(model, classifier: torch.Tensor, loader, device: torch.device, precision: str,
                  topk: Tuple[int, ...]) -> torch.Tensor:
    """[len(topk) + 1] float64: images whose label is within the top k of 100 x cos, per k, and
    the number of images."""
    dtype = input_dtype(precision)
    counts = torch.zeros(len(topk) + 1, dtype=torch.float64)
    for images, labels in loader:
        images = images.to(device=device, dtype=dtype)
        with autocast(precision, device):
            features = model.encode_image(images)
        logits = 100.0 * F.normalize(features.float(), dim=-1) @ classifier
        pred = logits.topk(max(topk), dim=1).indices.cpu()
        hit = pred == labels.view(-1, 1)
        for j, k in enumerate(topk):
            counts[j] += hit[:, :k].any(dim=1).sum()
        counts[-1] += labels.numel()
    return counts


class ZeroShotEvaluator:
    """Built once (lists and checks the sets); called after an epoch's evaluation."""

    def __init__(self, cfg: ZeroShotCfg, preprocess: Callable, tokenizer):
        self.cfg, self.preprocess, self.tokenizer = cfg, preprocess, tokenizer
        self.sets = build_sets(cfg) if cfg.enabled else []

    def __call__(self, model, epoch: int, epochs: int, device: torch.device, precision: str,
                 world: World) -> Dict[str, float]:
        if not self.sets or not self.cfg.due(epoch, epochs):
            return {}
        was_training = model.training
        model.eval()
        try:
            return self._run(model, device, precision, world)
        finally:
            model.train(was_training)

    def _run(self, model, device, precision, world) -> Dict[str, float]:
        results: Dict[str, float] = {}
        classifiers: Dict[str, torch.Tensor] = {}
        for s in self.sets:
            ident = s.classifier
            if ident not in classifiers:
                logging.info(f"zero-shot: building the classifier for {s.key} ({len(s.classnames)} classes x "
                             f"{len(s.templates)} templates)")
                classifiers[ident] = class_embeddings(model, self.tokenizer, s.classnames, s.templates, world,
                                                      device, precision)
            topk = (1, 5) if len(s.classnames) >= TOP5_MIN_CLASSES else (1,)
            mine = Subset(_Images(s.samples, self.preprocess), _shard(len(s.samples), world.rank, world.world_size))
            loader = DataLoader(mine, batch_size=self.cfg.batch_size, num_workers=self.cfg.workers, shuffle=False)
            counts = count_correct(model, classifiers[ident], loader, device, precision, topk)
            counts = dist_env.all_reduce_sum(counts.to(device)).cpu()
            n = float(counts[-1])
            for j, k in enumerate(topk):
                results[f"{s.key}-top{k}"] = float(counts[j]) / n
            logging.info(f"zero-shot {s.key}: " + ", ".join(f"top{k} {results[f'{s.key}-top{k}']:.4f}" for k in topk)
                         + f" over {int(n)} images")
        return results


def evaluate_zeroshot(model, tokenizer, preprocess: Callable, cfg: ZeroShotCfg, epoch: int, epochs: int,
                      device: torch.device, precision: str, world: World) -> Dict[str, float]:
    """One-off form of `ZeroShotEvaluator` (lists the sets on each call)."""
    return ZeroShotEvaluator(cfg, preprocess, tokenizer)(model, epoch, epochs, device, precision, world)
