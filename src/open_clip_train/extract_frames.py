"""Pre-decode every MSR-VTT video once into a frame store (see video/frame_store.py).

    python -m open_clip_train.extract_frames ROOT --out FRAMES_DIR [--max-frames 12] [--image-size S]
    torchrun --nproc-per-node 8 -m open_clip_train.extract_frames ROOT --out FRAMES_DIR

Videos: every `video_id` of ROOT/MSRVTT_data.json (and of the 1k-A csv, if present), read from
ROOT/videos/<video_id>.mp4 or --video-dir. Each torchrun rank decodes its own contiguous block;
videos already stored are skipped, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m open_clip_train.extract_frames", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="MSR-VTT root with MSRVTT_data.json")
    parser.add_argument("--out", required=True, help="frame store folder")
    parser.add_argument("--video-dir", default=None, help="default: ROOT/videos")
    parser.add_argument("--max-frames", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize frames whose short side is larger down to this (default: keep)")
    args = parser.parse_args(argv)
    if args.max_frames < 1:
        parser.error(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.image_size is not None and args.image_size < 16:
        parser.error(f"--image-size must be >= 16, got {args.image_size}")
    video_dir = Path(args.video_dir) if args.video_dir else Path(args.root) / "videos"
    if not video_dir.is_dir():
        parser.error(f"video folder {video_dir} does not exist (set --video-dir)")
    if Path(args.out).is_file():
        parser.error(f"--out {args.out} is a file, not a folder")
    args.video_dir = video_dir
    return args


def _video_ids(root: str) -> list[str]:
    from .video import msrvtt

    ann = msrvtt.load_annotations(root)
    ids = list(ann.split_of)
    if (Path(root) / msrvtt.TEST_1KA_CSV).exists():
        ids += msrvtt.test_split(root, "1k-A").video_ids
    return sorted(dict.fromkeys(ids))


def run(args: argparse.Namespace) -> int:
    from .distributed import world_from_env
    from .video.frame_store import extract
    from .video.frames import FrameSpec

    try:
        world = world_from_env()
        spec = FrameSpec(args.max_frames, 1, args.image_size)
        ids = _video_ids(args.root)
    except (ValueError, UserError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    start, last = time.perf_counter(), [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            print(f"rank {world.rank}: {done}/{total} videos ({done / max(now - start, 1e-9):.1f}/s)", flush=True)

    try:
        report = extract(ids, args.video_dir, args.out, spec, world.rank, world.world_size, progress)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    print(f"rank {world.rank}/{world.world_size}: wrote {report.written}, skipped {report.skipped} already stored, "
          f"{len(report.bad)} bad video(s){': ' + ', '.join(sorted(report.bad)[:5]) if report.bad else ''}; "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_parse(argv))


if __name__ == "__main__":
    sys.exit(main())
