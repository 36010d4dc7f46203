"""`python -m open_clip_train.extract_teacher --dataset-type msrvtt ...`: a video teacher run once
over the MSR-VTT training videos and captions, written as video/teacher_cache.py's format.

    python -m open_clip_train.extract_teacher --dataset-type msrvtt --train-data ROOT \\
        --teacher-model xclip --teacher-pretrained xclip.bin --out cache/ [--frames-root FRAMES]
    torchrun --nproc_per_node 4 -m open_clip_train.extract_teacher --dataset-type msrvtt ...  # a shard per rank

Frames go through the teacher's own eval transform, captions through its tokenizer cut to
--max-words as the trainer cuts them; each rank embeds every world_size-th video and caption.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import DataLoader, default_collate

from .. import distributed as dist_env
from ..distill.cache import MANIFEST
from ..errors import UserError
from ..precision import PRECISIONS
from .distill_run import TeacherInputs, build_teacher, frame_sampling
from .model import VideoModelCfg
from .teacher_cache import DTYPES, VideoShardWriter, manifest_meta, write_manifest
from .training import TRAIN_SPLITS, VideoCfg, frame_source


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _OneLineParser(prog="python -m open_clip_train.extract_teacher --dataset-type msrvtt",
                       description=__doc__.split("\n")[0])
    p.add_argument("--dataset-type", choices=["msrvtt"], required=True)
    p.add_argument("--train-data", required=True, help="MSR-VTT root (MSRVTT_data.json, the train csvs, videos/).")
    p.add_argument("--msrvtt-train-split", default="9k", help=f"{' | '.join(TRAIN_SPLITS)} or a csv with video_id.")
    p.add_argument("--video-root", default=None, help="Folder of <video_id>.mp4 (default ROOT/videos).")
    p.add_argument("--frames-root", default=None, help="An extracted frame store (extract_frames) instead of mp4s.")
    p.add_argument("--max-frames", type=int, default=12, help="Frames per video (as the trainer's).")
    p.add_argument("--max-words", type=int, default=32, help="Tokens per caption (as the trainer's).")
    p.add_argument("--teacher-model", required=True, help="'xclip' or a model config name (per-frame teacher).")
    p.add_argument("--teacher-pretrained", required=True, help="Teacher weights file.")
    p.add_argument("--out", required=True, help="Cache directory to write.")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="Stored feature dtype.")
    p.add_argument("--teacher-words", action="store_true",
                   help="Store per-token features (needed by an X-CLIP teacher; on for xclip).")
    p.add_argument("--batch-size", type=int, default=16, help="Videos / captions per teacher forward.")
    p.add_argument("--workers", type=int, default=4, help="Decoding workers per rank.")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="Teacher precision.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="cuda:<local rank> when available.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing cache in --out.")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.max_frames < 1:
        p.error("--batch-size and --max-frames must be >= 1 and --workers >= 0")
    return args


def _collate(items):
    frames, mask, index = default_collate([item[:3] for item in items])
    return frames, mask, index, [b for item in items for b in item[3]]


def run_shard(inputs: TeacherInputs, split, frames_source, out: str | Path, rank: int, world_size: int, *,
              max_frames: int, words: bool, dtype: str, batch_size: int, workers: int) -> int:
    """Embed this rank's share of videos and captions into shard_{rank}.*; returns bad videos."""
    from .dataset import VideoDataset

    teacher = inputs.teacher
    vids = split.video_ids[rank::world_size]
    pairs = split.pair_ids()
    captions = split.flat_captions()[rank::world_size]
    sen_ids = pairs[rank::world_size, 1].tolist()
    probe = teacher.encode_text(inputs.tokenizer(["a"]))
    dim = probe.sentence.shape[1]
    writer = VideoShardWriter(out, rank, n_videos=len(vids), n_captions=len(captions), max_frames=max_frames, dim=dim,
                              words=probe.words.shape[1] if words and probe.words is not None else None, dtype=dtype)
    loader = DataLoader(VideoDataset(vids, frames_source, inputs.transform(), max_frames), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate)
    bad = 0
    for frames, mask, index, bad_items in loader:
        bad += len(bad_items)  # embedded as the trainer's stand-in (black frames)
        writer.add_videos([vids[i] for i in index.tolist()], teacher.encode_video(frames, mask))
    for start in range(0, len(captions), batch_size):
        writer.add_captions(sen_ids[start:start + batch_size],
                            teacher.encode_text(inputs.tokenizer(captions[start:start + batch_size])))
    writer.finish()
    return bad


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
        from .msrvtt import train_split
        from .training import check

        out = Path(args.out)
        video = VideoCfg(train_split=args.msrvtt_train_split, video_root=args.video_root, frames_root=args.frames_root,
                         max_words=args.max_words, model=VideoModelCfg(max_frames=args.max_frames))
        check(video, args.train_data, None)
        if (out / MANIFEST).exists() and not args.overwrite:
            raise ValueError(f"{out} already holds a teacher cache; pass --overwrite to replace it")
        split = train_split(args.train_data, video.train_split)
        inputs = build_teacher(args.teacher_model, args.teacher_pretrained, max_words=args.max_words, device=device,
                               precision=args.precision)
        dist_env.barrier()  # every rank has looked before rank 0 removes the old manifest
        if world.is_master and (out / MANIFEST).exists():
            (out / MANIFEST).unlink()
        t0 = time.perf_counter()
        words = args.teacher_words or inputs.teacher.needs_words
        bad = run_shard(inputs, split, frame_source(video, args.train_data), out, world.rank, world.world_size,
                        max_frames=args.max_frames, words=words, dtype=args.dtype, batch_size=args.batch_size,
                        workers=args.workers)
        if bad:
            logging.warning(f"rank {world.rank}: {bad} unreadable video(s) cached as black frames")
        dist_env.barrier()
        if world.is_master:
            size = inputs.preprocess_cfg["size"]
            meta = manifest_meta(inputs.teacher, frame_sampling=frame_sampling(args.frames_root),
                                 max_frames=args.max_frames, max_words=args.max_words, image_size=size,
                                 data_root=args.train_data)
            manifest = write_manifest(out, meta, world.world_size, inputs.teacher.head_state())
            logging.info(f"video teacher cache {out}: {manifest['counts']['videos']} videos, "
                         f"{manifest['counts']['captions']} captions from {world.world_size} shard(s) "
                         f"in {time.perf_counter() - t0:.0f}s")
        dist_env.barrier()
        return 0
    except (ValueError, UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_env.close()
