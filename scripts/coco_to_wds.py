"""COCO captions json + image folder -> webdataset tar shards.

    python scripts/coco_to_wds.py ANN_JSON OUT_DIR [--images DIR] [--shard-size N]
                                  [--pattern NAME-%05d.tar] [--no-shuffle] [--seed K]

One sample per (image, caption) pair -- key <image id>_<k>, the image's original bytes
under its own extension (jpg/png/...), the caption as .txt, {"image_id", "caption_index"} as .json --
because upstream's webdataset trainer reads exactly one caption per sample. An image is
therefore stored once per caption; evaluation regroups samples with identical image bytes.
Pairs are shuffled (deterministically, --seed) so that one image's pairs rarely share a
training batch, where they would be false negatives for each other.
Writes sizes.json next to the shards, so training needs no train_num_samples.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

from open_clip_train.data.coco import load_coco_captions


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
    tar.addfile(info, io.BytesIO(data))


def convert(ann_file: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
            shard_size: int = 10_000, pattern: str = "shard-%05d.tar", shuffle: bool = True,
            seed: int = 0) -> list[Path]:
    """Write the shards and sizes.json; return the shard paths in order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    try:
        pattern % 0
    except TypeError:
        raise ValueError(f"pattern {pattern!r} needs one %d-style field for the shard index") from None
    coco = load_coco_captions(ann_file, image_root)
    if not coco.paths:
        raise ValueError(f"{ann_file}: no captioned images")
    ids, paths, captions = coco.image_ids, coco.paths, coco.captions
    pairs = [(i, k) for i, caps in enumerate(captions) for k in range(len(caps))]
    if shuffle:
        random.Random(seed).shuffle(pairs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, sizes = [], {}
    for start in range(0, len(pairs), shard_size):
        shard = out_dir / (pattern % len(shards))
        chunk = pairs[start : start + shard_size]
        with tarfile.open(shard, "w") as tar:
            for i, k in chunk:
                key = f"{ids[i]:012d}_{k}"
                ext = Path(paths[i]).suffix.lower().lstrip(".") or "jpg"
                _add(tar, f"{key}.{ext}", Path(paths[i]).read_bytes())
                _add(tar, f"{key}.txt", captions[i][k].encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps({"image_id": ids[i], "caption_index": k}).encode())
        shards.append(shard)
        sizes[shard.name] = len(chunk)
    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ann_file", help="e.g. ROOT/annotations/captions_train2017.json")
    parser.add_argument("out_dir")
    parser.add_argument("--images", default=None, help="image folder (default: the standard COCO layout)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--pattern", default="shard-%05d.tar", help="shard file name, %%d = shard index")
    parser.add_argument("--no-shuffle", action="store_true", help="keep pairs in image-id order")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        shards = convert(args.ann_file, args.out_dir, args.images, args.shard_size, args.pattern,
                         not args.no_shuffle, args.seed)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    total = sum(json.loads((Path(args.out_dir) / "sizes.json").read_text()).values())
    print(f"wrote {total} samples in {len(shards)} shards: {shards[0]} .. {shards[-1].name}")


if __name__ == "__main__":
    main()
