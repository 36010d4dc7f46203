"""`python -m open_clip_train.compare RUN_DIR... [--sort KEY] [--best-by KEY] [--out report.md] [--plot curves.png]`

Compare finished (or running) training runs side by side, as markdown tables:

* Runs: model, text tower, freeze / unfreeze strategy in words, distill / headalign (teacher),
  lr / epochs, warmup, batch x world x accum = global batch, trainable params at INIT.
* COCO protocol (`coco_*` keys; every caption of an image counts as a match): I2T and T2I
  R@1/5/10 at the last evaluated epoch and at the best one.
* Pairwise (upstream) metrics (`image_to_text_*` / `text_to_image_*`; an image's other captions
  count as negatives): the same, for comparison with upstream OpenCLIP runs only. The two
  protocols are never mixed in one column, and never compared with each other.

"Best" is the evaluated epoch with the highest mean of I2T R@1 and T2I R@1 (`--best-by mean_r1`,
the default) or the highest sum of all six recalls (`--best-by rsum`); ties go to the higher sum
of all six recalls, then to the earlier epoch. It is chosen separately per protocol.

A run directory holds any of: params.txt (upstream's sorted `name: value` lines), metrics.jsonl
(this trainer's losses per logging step), out.log (upstream's or this trainer's log lines: INIT
counts, unlocks, and the loss curve when there is no metrics.jsonl), results.jsonl in
RUN/checkpoints/ (ours) or RUN/ (upstream). Missing files and half-written results lines are
reported in a Notes section and as `warning:` lines on stderr, never fatal. A path that is not a run directory is a warning;
it is an `error:` line and exit code 2 only when no run directory is left.

Reads only text files: no torch import. `--plot` needs matplotlib (imported only then).

Modules: runs (reading a run directory), words (settings in words), summary (per-protocol
last / best epochs, sorting), markdown, plot, cli (`main`, also `__main__`).
"""
from .cli import build_parser, collect_runs, main
from .markdown import render
from .plot import loss_curve, plot, short_names
from .runs import LogInfo, Run, TrainPoint, is_run_dir, load_run, parse_log, parse_params, read_log, read_metrics
from .summary import BEST_BY, PROTOCOLS, recalls, sort_keys, sort_runs, summarize
from .words import freeze_in_words, global_batch, teacher_words, text_tower

__all__ = ["BEST_BY", "LogInfo", "PROTOCOLS", "Run", "TrainPoint", "build_parser", "collect_runs", "freeze_in_words",
           "global_batch", "is_run_dir", "load_run", "loss_curve", "main", "parse_log", "parse_params", "plot",
           "read_log", "read_metrics", "recalls", "render", "short_names", "sort_keys", "sort_runs", "summarize",
           "teacher_words", "text_tower"]
