"""Run a teacher once over a training set (COCO or CSV) and store its embeddings (teacher_cache.py).

    python -m open_clip_train.extract_teacher --teacher-model convnext_base_w \\
        --teacher-pretrained open_clip_pytorch_model.bin --dataset-type coco \\
        --train-data annotations/captions_train2017.json --out teacher_cache/ [--precision amp]
    torchrun --nproc_per_node 4 -m open_clip_train.extract_teacher ...   # one shard per rank

Images go through the teacher's un-augmented eval transform; each rank embeds every
world_size-th image and caption, writes shard_{rank}.*, and rank 0 writes manifest.json after
all ranks are done. Rows are keyed by the ids the trainer's data carries (data.Captioned):
COCO image / annotation ids; for CSV the image's first-appearance index and the caption's row.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed as dist_env
from ..errors import UserError, register_flags
from ..params import flag_spellings
from ..precision import PRECISIONS
from .teacher import Teacher
from .cache import DTYPES, MANIFEST, ShardWriter, image_root_of, manifest_meta, write_manifest



@dataclass
class Samples:
    """Images and their captions flattened image by image, in the training data's order, with
    the ids the trainer's batches carry (ann_ids: the caption ids)."""
    image_ids: List[int]
    paths: List[str]
    ann_ids: List[int]
    captions: List[str]
    caption_image_ids: List[int]  # the image id of each caption



def samples_of(data) -> Samples:
    """A data.Captioned as flat Samples (the same ids as Captioned.pair_ids)."""
    pairs = data.pair_ids()
    return Samples([int(i) for i in data.image_ids], list(data.images), pairs[:, 1].tolist(),
                   [c for cs in data.captions for c in cs], pairs[:, 0].tolist())


def coco_samples(ann_file: str | Path, image_root: Optional[str | Path] = None) -> Samples:
    from ..data import load_captioned

    return samples_of(load_captioned("coco", str(ann_file), image_root))


def _embed_dims(teacher: Teacher) -> tuple[int, int]:
    h, w = teacher.preprocess_cfg["size"] if not isinstance(teacher.preprocess_cfg["size"], int) \
        else (teacher.preprocess_cfg["size"],) * 2
    image = teacher.encode_image(torch.zeros(1, 3, h, w))
    text = teacher.encode_text(teacher.tokenizer(["a"]))
    return image.shape[1], text.shape[1]


def run_shard(
        teacher: Teacher,
        samples: Samples,
        out_dir: str | Path,
        rank: int = 0,
        world_size: int = 1,
        *,
        batch_size: int = 64,
        workers: int = 0,
        dtype: str = "float32",
        log_every: int = 50,
) -> None:
    """Embed this rank's share (every world_size-th image and caption) and write shard_{rank}.*."""
    from ..data import BadTally, ImageDataset
    from ..data.bad_samples import collate

    img_sel = list(range(rank, len(samples.paths), world_size))
    txt_sel = list(range(rank, len(samples.captions), world_size))
    image_dim, text_dim = _embed_dims(teacher)
    writer = ShardWriter(out_dir, rank, len(img_sel), len(txt_sel), image_dim, text_dim, dtype)

    dataset = ImageDataset([samples.paths[i] for i in img_sel], teacher.preprocess())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), collate_fn=collate)
    bad = BadTally()
    ids = np.asarray([samples.image_ids[i] for i in img_sel], dtype=np.int64)
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        images, local = batch
        bad.add(batch.bad)  # embedded as black stand-ins: the cache keeps one row per image
        writer.add_images(ids[local.numpy()], teacher.encode_image(images))
        if log_every and (step + 1) % log_every == 0:
            done = writer.filled["image"]
            logging.info(f"rank {rank}: {done}/{len(img_sel)} images ({time.perf_counter() - t0:.0f}s)")

    captions = [samples.captions[i] for i in txt_sel]
    ann_ids = np.asarray([samples.ann_ids[i] for i in txt_sel], dtype=np.int64)
    for start in range(0, len(captions), batch_size):
        tokens = teacher.tokenizer(captions[start:start + batch_size])
        writer.add_texts(ann_ids[start:start + batch_size], teacher.encode_text(tokens))
    writer.finish()
    if bad.total:
        logging.warning(f"rank {rank}: {bad.describe(of=len(img_sel))} (cached as black images)")
    logging.info(f"rank {rank}: wrote {len(img_sel)} images, {len(txt_sel)} captions "
                 f"in {time.perf_counter() - t0:.0f}s")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _OneLineParser(prog="python -m open_clip_train.extract_teacher", description=__doc__.split("\n")[0])
    p.add_argument("--teacher-model", "--distill-model", required=True, help="Teacher model config name.")
    p.add_argument("--teacher-pretrained", "--distill-pretrained", required=True, help="Teacher weights file.")
    p.add_argument("--dataset-type", default="auto", choices=["auto", "coco", "csv"],
                   help="Training set format (auto: .json -> coco, .csv/.tsv -> csv).")
    p.add_argument("--train-data", required=True, help="COCO captions json (captions_train2017.json) or CSV/TSV.")
    p.add_argument("--train-image-root", default=None,
                   help="Image folder (COCO default: ROOT/<split>/ for ROOT/annotations/captions_<split>.json; "
                        "CSV: relative paths as written).")
    p.add_argument("--csv-separator", default="\t", help="CSV/TSV column separator (as the trainer's).")
    p.add_argument("--csv-img-key", default="filepath", help="CSV image path column (as the trainer's).")
    p.add_argument("--csv-caption-key", default="title", help="CSV caption column (as the trainer's).")
    p.add_argument("--out", required=True, help="Cache directory to write.")
    p.add_argument("--batch-size", type=int, default=64, help="Images / captions per teacher forward.")
    p.add_argument("--workers", type=int, default=4, help="Image decoding workers per rank.")
    p.add_argument("--precision", default="amp", choices=PRECISIONS, help="Teacher precision.")
    p.add_argument("--text-tokenizer", default=None, help="HF tokenizer dir (GPT-2 teachers only).")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="Stored embedding dtype.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="cuda:<local rank> when available.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing cache in --out.")
    register_flags(flag_spellings(p))  # the library's messages spell settings as this tool does
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    try:
        world = dist_env.world_from_env()
        device = dist_env.pick_device(world, args.device)
        dist_env.init(world, device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = Path(args.out)
        if (out / MANIFEST).exists() and not args.overwrite:
            raise ValueError(f"{out} already holds a teacher cache; pass --overwrite to replace it")
        dist_env.barrier()  # every rank has looked before rank 0 removes the old manifest
        if world.is_master and (out / MANIFEST).exists():
            (out / MANIFEST).unlink()  # until the new one is complete, the directory is no cache
        teacher = Teacher.from_pretrained(args.teacher_model, args.teacher_pretrained, device=device,
                                          precision=args.precision, text_tokenizer=args.text_tokenizer)
        from ..data import load_captioned, resolve_dataset_type

        kind = resolve_dataset_type(args.dataset_type, args.train_data)
        captioned = load_captioned(kind, args.train_data, args.train_image_root, csv_img_key=args.csv_img_key,
                                   csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator)
        samples = samples_of(captioned)
        run_shard(teacher, samples, out, world.rank, world.world_size,
                  batch_size=args.batch_size, workers=args.workers, dtype=args.dtype)
        dist_env.barrier()
        if world.is_master:
            image_root = image_root_of(captioned.images)
            meta = manifest_meta(
                teacher_model=args.teacher_model, weights_path=args.teacher_pretrained,
                logit_scale=float(teacher.logit_scale()), precision=args.precision,
                annotations=args.train_data, image_root=image_root,
                preprocess_cfg=teacher.preprocess_cfg, dataset_type=kind,
                columns=[args.csv_img_key, args.csv_caption_key] if kind == "csv" else None,
            )
            manifest = write_manifest(out, meta, world.world_size)
            logging.info(f"teacher cache {out}: {manifest['counts']['images']} images, "
                         f"{manifest['counts']['texts']} captions from {world.world_size} shard(s)")
        dist_env.barrier()
        return 0
    except (ValueError, UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_env.close()


if __name__ == "__main__":
    sys.exit(main())
