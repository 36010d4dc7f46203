"""Write a small synthetic MSR-VTT (moving shapes) for demos and tests (see video/demo.py).

    python -m open_clip_train.demo_video_data OUT_DIR [--num-train 300] [--num-test 60] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m open_clip_train.demo_video_data", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_train < 2:
        parser.error(f"--num-train must be >= 2, got {args.num_train}")
    if args.num_test < 1:
        parser.error(f"--num-test must be >= 1, got {args.num_test}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if Path(args.out_dir).is_file():
        parser.error(f"{args.out_dir} is a file, not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    from .video.demo import write_demo

    args = _parse(argv)
    start = time.perf_counter()
    counts = write_demo(args.out_dir, args.num_train, args.num_test, args.seed)
    print(f"wrote {counts['train']} train ({counts['train_7k']} in the 7k list) + {counts['test']} test clips, "
          f"{counts['sentences']} captions, to {args.out_dir} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
