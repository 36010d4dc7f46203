"""`python -m open_clip_train.compare`: flags, collecting the run directories, printing the report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..errors import UserError
from .markdown import render
from .plot import plot
from .runs import Run, is_run_dir, load_run, run_names
from .summary import BEST_BY, sort_keys, sort_runs

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m open_clip_train.compare",
        description="Compare training runs (params.txt, out.log, results.jsonl) as markdown tables.",
        epilog="Sort keys: " + ", ".join(sort_keys()) + ". Recall keys read the COCO protocol at the last epoch; "
               "best_* the best epoch; pw_* the pairwise (upstream) metrics.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--sort", choices=sorted(sort_keys()), default=None, metavar="KEY",
                   help="Sort runs by this column (default: the order given). Recalls sort best first.")
    p.add_argument("--best-by", choices=sorted(BEST_BY), default="mean_r1",
                   help="How the best epoch is chosen: mean_r1 = mean of I2T and T2I R@1 (default); "
                        "rsum = sum of all six recalls.")
    p.add_argument("--out", type=Path, default=None, metavar="REPORT.md",
                   help="Also write the markdown report here.")
    p.add_argument("--plot", type=Path, default=None, metavar="CURVES.png",
                   help="Write recall and loss curves to this PNG (needs matplotlib).")
    return p


def collect_runs(paths: Sequence[Path], best_by: str) -> Tuple[List[Run], List[str]]:
    """(runs, warnings for paths that are not run directories). Raises UserError when none is."""
    good = [p for p in paths if is_run_dir(p)]
    bad = [p for p in paths if p not in good]
    what = "(a run directory has params.txt, out.log or results.jsonl)"
    if not good:
        raise UserError(f"no run directory among {', '.join(map(str, bad))} {what}")
    warnings = [f"{p} is not a run directory {what}; skipped" for p in bad]
    return [load_run(p, n, best_by) for p, n in zip(good, run_names(good))], warnings


def main(argv: Optional[List[str]] = None) -> int:
    """Print the report; returns the exit code (0 ok, 2 user error, argparse's code for bad flags)."""
    try:
        args = build_parser().parse_args(argv)  # prints its own usage + error line
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        runs, warnings = collect_runs(args.runs, args.best_by)
        for w in warnings + [f"{r.name}: {n}" for r in runs for n in r.notes]:
            print(f"warning: {w}", file=sys.stderr)
        if args.sort:
            runs = sort_runs(runs, args.sort)
        report = render(runs, args.best_by, args.sort, warnings)
        print(report, end="", flush=True)
        if args.out is not None:
            try:
                args.out.write_text(report)
            except OSError as e:
                raise UserError(f"cannot write --out {args.out}: {e.strerror or e}") from None
        if args.plot is not None:
            plot(runs, args.plot)
        return 0
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
