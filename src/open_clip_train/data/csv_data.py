"""CSV / TSV (upstream layout: an image-path column and a caption column) -> images with captions.

Rows are grouped by image path so that retrieval evaluation does not treat an image's
other captions as negatives; training still sees every row once per epoch.
"""
from __future__ import annotations

import csv
from pathlib import Path


def load_csv_rows(
    path: str | Path,
    img_key: str = "filepath",
    caption_key: str = "title",
    sep: str = "\t",
    image_root: str | Path | None = None,
) -> tuple[list[str], list[list[str]], list[list[int]]]:
    """Unique image paths (first-appearance order), each one's captions (row order) and each
    caption's data row number (0 = the first row after the header): the caption's stable id (the
    image's id is its index in the unique-image list).

    Relative image paths are resolved against image_root when given, else (as upstream)
    against the working directory.
    """
    path = Path(path)
    groups: dict[str, list[str]] = {}
    rows: dict[str, list[int]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep)
        missing = [k for k in (img_key, caption_key) if k not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {reader.fieldnames})")
        for n, row in enumerate(reader):
            image, caption = row[img_key], row[caption_key]
            if image is None or caption is None:
                raise ValueError(f"{path}: line {reader.line_num} has too few fields")
            groups.setdefault(image, []).append(caption.strip())
            rows.setdefault(image, []).append(n)
    if not groups:
        raise ValueError(f"{path}: no rows")
    root = Path(image_root) if image_root is not None else None
    images = [str(root / p) if root is not None else p for p in groups]
    return images, list(groups.values()), list(rows.values())
