"""COCO captions (captions_<split>.json) -> image paths with their captions."""
from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

_REQUIRED_KEYS = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "caption")}


@dataclass
class CocoCaptions:
    """Captioned images sorted by id; captions of each image sorted by annotation id."""

    image_ids: list[int]
    paths: list[str]
    captions: list[list[str]]
    ann_ids: list[list[int]] = field(default_factory=list)  # annotation id of each caption


def default_image_root(ann_file: str | Path) -> Path:
    """Standard layout: ROOT/annotations/captions_<split>.json -> ROOT/<split>/."""
    ann_file = Path(ann_file)
    match = re.fullmatch(r"captions_(.+)\.json", ann_file.name)
    if match is None:
        raise ValueError(
            f"{ann_file}: cannot infer the image folder from a name not like captions_<split>.json; "
            "set the image root explicitly"
        )
    parent = ann_file.parent
    return (parent.parent if parent.name == "annotations" else parent) / match.group(1)


def _validate(ann_file: Path, data: Any) -> None:
    """Check what we and pycocotools rely on; fail with one line naming file and problem."""
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    for section, keys in _REQUIRED_KEYS.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise ValueError(f"{ann_file}: missing or non-list '{section}'")
        for i, entry in enumerate(entries):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise ValueError(f"{ann_file}: {section}[{i}] is missing key '{missing[0]}'")
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann["caption"], str):
            raise ValueError(f"{ann_file}: annotations[{i}] caption is not a string")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{ann_file}: annotations[{i}] refers to unknown image_id {ann['image_id']!r}")


def load_coco_captions(ann_file: str | Path, image_root: str | Path | None = None) -> CocoCaptions:
    """The images that have captions, with their paths (image_root or the standard layout)."""
    ann_file = Path(ann_file)
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{ann_file}: not UTF-8 text ({e.reason})") from None
    _validate(ann_file, data)
    root = Path(image_root) if image_root is not None else default_image_root(ann_file)
    if not root.is_dir():
        raise ValueError(f"{ann_file}: image folder {root} does not exist (set the image root)")

    coco = COCO()  # built from the parsed dict: pycocotools would re-read and print otherwise
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()

    out = CocoCaptions([], [], [], [])
    for img_id in sorted(coco.imgs):
        anns = sorted(coco.imgToAnns.get(img_id, []), key=lambda a: a["id"])
        if anns:
            out.image_ids.append(img_id)
            out.paths.append(str(root / coco.imgs[img_id]["file_name"]))
            out.captions.append([a["caption"].strip() for a in anns])
            out.ann_ids.append([int(a["id"]) for a in anns])
    return out
