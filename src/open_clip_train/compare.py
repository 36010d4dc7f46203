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

A run directory holds any of: params.txt (upstream's sorted `name: value` lines), out.log
(upstream's or this trainer's log lines), results.jsonl in RUN/checkpoints/ (ours) or RUN/
(upstream). Missing files and half-written results lines are reported in a Notes section and
as `warning:` lines on stderr, never fatal. A path that is not a run directory is a warning;
it is an `error:` line and exit code 2 only when no run directory is left.

Reads only text files: no torch import. `--plot` needs matplotlib (imported only then).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import UserError
from .run_outputs import parse_jsonl

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
# protocol -> direction -> key prefix in results.jsonl
PROTOCOLS: Dict[str, Dict[str, str]] = {
    "coco": {"i2t": "coco_i2t", "t2i": "coco_t2i"},
    "pairwise": {"i2t": "image_to_text", "t2i": "text_to_image"},
}
PROTOCOL_TITLES = {
    "coco": "COCO protocol (`coco_*` keys: every caption of an image counts as a match)",
    "pairwise": "Pairwise (upstream) metrics; not comparable to COCO protocol",
}
PAIRWISE_EXPLAINED = ("`image_to_text_*` / `text_to_image_*` keys: upstream's pairwise retrieval over "
                      "(image, caption) pairs, where an image's other captions count as negatives, so "
                      "R@1 is capped near 1/captions-per-image. Use it to compare with upstream OpenCLIP runs only.")
BEST_BY = {
    "mean_r1": "mean of I2T R@1 and T2I R@1",
    "rsum": "sum of I2T and T2I R@1/5/10",
}


# ---------------------------------------------------------------------------------------------
# reading a run directory


def parse_params(text: str) -> Dict[str, Any]:
    """params.txt (`name: value` per line, values written with str()) -> {name: python value}.

    Values that read as Python literals (`None`, `True`, `0.0007`, `['a', 'b']`) become those;
    anything else (paths, model names) stays the string it was written as.
    """
    out: Dict[str, Any] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        name, _, raw = line.partition(":")
        name, raw = name.strip(), raw.strip()
        if not name:
            continue
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[name] = raw
    return out


@dataclass
class Results:
    rows: List[Dict[str, Any]]  # one per evaluated epoch, sorted by epoch
    path: Optional[Path]
    notes: List[str]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def find_results(root: Path) -> Optional[Path]:
    """Ours write RUN/checkpoints/results.jsonl, upstream RUN/results.jsonl (older versions)."""
    for p in (root / "checkpoints" / "results.jsonl", root / "results.jsonl"):
        if p.is_file():
            return p
    return None


def parse_results(text: str, where: str = "results.jsonl") -> Tuple[List[Dict[str, Any]], List[str]]:
    """JSON lines -> (rows sorted by epoch, notes). A half-written or unreadable line is skipped
    with a note; a repeated epoch keeps its last row (a resumed run re-evaluated it)."""
    rows, bad = parse_jsonl(text)
    notes = [f"{where} line {i} is half-written or not JSON (skipped): {_clip(line, 60)!r}" for i, line in bad]
    by_epoch: Dict[int, Dict[str, Any]] = {}
    repeated = set()
    without_epoch = 0
    for row in rows:
        if not isinstance(row.get("epoch"), (int, float)):
            without_epoch += 1
            continue
        epoch = int(row["epoch"])
        if epoch in by_epoch:
            repeated.add(epoch)
        by_epoch[epoch] = row
    if without_epoch:
        notes.append(f"{where}: {_plural(without_epoch, 'row')} without an epoch (skipped)")
    if repeated:
        notes.append(f"{where}: epoch(s) {', '.join(map(str, sorted(repeated)))} evaluated more than once; "
                     "the last row of each is used")
    return [by_epoch[e] for e in sorted(by_epoch)], notes


def read_results(root: Path) -> Results:
    path = find_results(root)
    if path is None:
        return Results([], None, ["no results.jsonl (looked in checkpoints/ and the run directory)"])
    rows, notes = parse_results(path.read_text(errors="replace"), str(path.relative_to(root)))
    if not rows and not notes:
        notes.append(f"{path.relative_to(root)} is empty")
    return Results(rows, path, notes)


_COUNTS = r"visual=(\d+), text=(\d+), total=(\d+)"
_TRAINABLE_RE = re.compile(r"trainable params \((INIT|epoch (\d+))\): " + _COUNTS)
_UNLOCK_RE = re.compile(r"unlock at epoch (\d+): (.*)$")
_UNLOCK_TOWER_RE = re.compile(r"(\w+) \(\d+ tensors\)")
_TRAIN_RE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\](?: step (\d+))?")
_LOSS_RE = re.compile(r"(?<![\w.])([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*_loss|Loss): ([-+0-9.eE]+|nan|inf)")


@dataclass
class TrainPoint:
    epoch: int
    samples: int  # samples seen in this epoch (global), as logged
    samples_per_epoch: int
    step: Optional[int]  # logged by this trainer; None in upstream lines (derived later)
    losses: Dict[str, float]


@dataclass
class LogInfo:
    init_counts: Optional[Dict[str, int]] = None  # visual, text, total
    unlock_epochs: Dict[int, List[str]] = field(default_factory=dict)  # epoch -> what the log says
    points: List[TrainPoint] = field(default_factory=list)


def parse_log(lines) -> LogInfo:
    """out.log lines -> INIT trainable counts (the first INIT line, so a resumed run keeps its
    start), unlock epochs, and one TrainPoint per `Train Epoch:` line with every `*_loss` term."""
    info = LogInfo()
    for line in lines:
        if "Train Epoch:" in line:
            m = _TRAIN_RE.search(line)
            if m is None:
                continue
            losses = {}
            for name, v in _LOSS_RE.findall(line[m.end():]):
                try:
                    losses[name.lower()] = float(v)
                except ValueError:
                    pass
            info.points.append(TrainPoint(int(m.group(1)), int(m.group(2)), int(m.group(3)),
                                          int(m.group(4)) if m.group(4) is not None else None, losses))
            continue
        m = _TRAINABLE_RE.search(line)
        if m is not None:
            counts = dict(zip(("visual", "text", "total"), map(int, m.group(3, 4, 5))))
            if m.group(1) == "INIT" and info.init_counts is None:
                info.init_counts = counts
            elif m.group(2) is not None:
                info.unlock_epochs.setdefault(int(m.group(2)), [])
            continue
        m = _UNLOCK_RE.search(line)
        if m is not None:
            towers = _UNLOCK_TOWER_RE.findall(m.group(2)) or [m.group(2).strip()]
            info.unlock_epochs.setdefault(int(m.group(1)), []).extend(towers)
    return info


def read_log(root: Path) -> Optional[LogInfo]:
    """out.log's INIT counts and unlocks; the loss curve from metrics.jsonl (this trainer's
    runs), else from out.log's `Train Epoch:` lines (upstream's runs and older ones of ours).
    None when the run has neither file."""
    path = root / "out.log"
    info = None
    if path.is_file():
        with open(path, errors="replace") as f:
            info = parse_log(f)
    points = read_metrics(root)
    if points is not None:
        info = info or LogInfo()
        info.points = points
    return info


def read_metrics(root: Path) -> Optional[List[TrainPoint]]:
    """metrics.jsonl -> one TrainPoint per logging step (the last row of a step a resumed run
    logged twice), or None without the file. Rows missing a field are left out."""
    path = root / "metrics.jsonl"
    if not path.is_file():
        return None
    rows, _ = parse_jsonl(path.read_text(errors="replace"))
    by_step: Dict[int, TrainPoint] = {}
    for r in rows:
        try:
            point = TrainPoint(int(r["epoch"]), int(r["samples"]), int(r["samples_per_epoch"]), int(r["step"]),
                               {str(k): float(v) for k, v in r["losses"].items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        by_step[point.step] = point
    return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------------------------
# settings -> words


def _is_none(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() in ("", "None", "none"))


def _as_int(v: Any) -> Optional[int]:
    if _is_none(v) or isinstance(v, bool):
        return None
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _as_float(v: Any) -> Optional[float]:
    if _is_none(v) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) and not _is_none(v)


def _as_str(v: Any) -> Optional[str]:
    return None if _is_none(v) else str(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _tower_words(s: Mapping[str, Any], tower: str) -> Tuple[bool, Optional[str]]:
    """(locked at start, description or None when it is simply 'locked, never unlocked')."""
    unit = "group" if tower == "image" else "layer"
    lock = _as_bool(s.get(f"lock_{tower}"))
    keep = _as_int(s.get("lock_image_unlocked_groups" if tower == "image" else "lock_text_unlocked_layers")) or 0
    at = _as_int(s.get(f"unfreeze_{tower}_at_epoch"))
    count = _as_int(s.get("unlocked_image_groups" if tower == "image" else "unlocked_text_layers"))
    epochs = _as_int(s.get("epochs"))
    if not lock:
        words = f"{tower} trainable"
        if at is not None:
            words += f" (unfreeze at epoch {at} has nothing to unlock)"
        return False, words
    words = f"{tower} locked" + (f" except the last {_plural(keep, unit)}" if keep else "")
    if at is None:
        return True, (None if not keep else words + ", never unlocked further")
    what = f"all {unit}s" if count is None else _plural(count, unit)
    words += f", unlock {what} at epoch {at}"
    if epochs is not None and at >= epochs:
        words += f" (never reached: the run has {epochs} epochs)"
    return True, words


def freeze_in_words(settings: Mapping[str, Any]) -> str:
    """The freeze / unfreeze strategy of a run's settings (params.txt values), in words, e.g.
    "image locked, unlock 4 groups at epoch 5; text locked, unlock 6 layers at epoch 3; new lr x0.1".

    Unlock epochs count completed epochs (the unlock applies from the start of that epoch).
    Missing keys (upstream runs) read as upstream's defaults: nothing locked, no unfreeze."""
    img_locked, img = _tower_words(settings, "image")
    txt_locked, txt = _tower_words(settings, "text")
    if img_locked and txt_locked and img is None and txt is None:
        parts = ["image and text locked, never unlocked"]
    elif not img_locked and not txt_locked and "nothing to unlock" not in f"{img}{txt}":
        parts = ["image and text not locked" if settings.get("lock_pattern") else "nothing locked"]
    else:
        parts = [img or "image locked, never unlocked", txt or "text locked, never unlocked"]
    unlocks = any(_as_int(settings.get(f"unfreeze_{t}_at_epoch")) is not None for t in ("image", "text"))
    scale = _as_float(settings.get("unfreeze_new_lr_scale"))
    if unlocks and scale is not None:
        ramp = _as_int(settings.get("unfreeze_warmup_steps")) or 0
        parts.append(f"new lr x{_fmt_num(scale)}" + (f" ramped over {ramp} steps" if ramp else ""))
    patterns = settings.get("lock_pattern")
    if isinstance(patterns, (list, tuple)) and patterns:
        parts.append("also locked: params matching " + ", ".join(f"`{p}`" for p in patterns))
    mults = settings.get("lr_mult")
    if isinstance(mults, (list, tuple)) and mults:
        shown = [f"`{m[0]}` x{_fmt_num(float(m[1]))}" if isinstance(m, (list, tuple)) and len(m) == 2 else str(m)
                 for m in mults]
        parts.append("lr mult " + ", ".join(shown))
    return "; ".join(parts)


def text_tower(settings: Mapping[str, Any]) -> str:
    """From the model name: gpt2 / cliptext / CLIP text (upstream's built-in text transformer)."""
    model = (_as_str(settings.get("model")) or "").lower()
    if not model:
        return "-"
    kind = "gpt2" if "gpt2" in model else "cliptext" if "cliptext" in model else "CLIP text"
    if _as_str(settings.get("pretrained_text_path")):
        kind += " (pretrained_text_path)"
    return kind


def teacher_words(settings: Mapping[str, Any]) -> str:
    """distill / headalign and the teacher, or '-'."""
    teacher = _as_str(settings.get("teacher_model")) or _as_str(settings.get("distill_model"))
    parts = []
    if _as_bool(settings.get("distill")) or _as_str(settings.get("distill_model")):
        parts.append("distill")
    head = settings.get("headalign")
    if isinstance(head, str) and not _is_none(head) and head.strip().lower() not in ("true", "false", "0", "1"):
        parts.append(f"headalign={head}")
    elif _as_bool(head):
        parts.append("headalign")
    if not parts:
        return "-"
    return " + ".join(parts) + (f" (teacher {teacher})" if teacher else "")


def _fmt_lr(lr: Optional[float]) -> str:
    if lr is None:
        return "-"
    if lr == 0 or abs(lr) >= 1e-2:
        return f"{lr:g}"
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def global_batch(settings: Mapping[str, Any]) -> Optional[Tuple[int, int, int, int]]:
    """(batch_size, world_size, accum_freq, global batch) or None without a batch size."""
    bs = _as_int(settings.get("batch_size"))
    if bs is None:
        return None
    world = _as_int(settings.get("world_size")) or 1
    accum = _as_int(settings.get("accum_freq")) or 1
    return bs, world, accum, bs * world * accum


# ---------------------------------------------------------------------------------------------
# metrics


def recalls(row: Mapping[str, Any], protocol: str) -> Optional[Dict[str, float]]:
    """{'i2t_r1': 0.0955, ...} for the protocol, or None when the row lacks any of its recalls."""
    out = {}
    for d in DIRECTIONS:
        for k in KS:
            v = _as_float(row.get(f"{PROTOCOLS[protocol][d]}_R@{k}"))
            if v is None or math.isnan(v):
                return None
            out[f"{d}_r{k}"] = v
    return out


def _score(r: Mapping[str, float], best_by: str) -> float:
    if best_by == "mean_r1":
        return (r["i2t_r1"] + r["t2i_r1"]) / 2
    if best_by == "rsum":
        return sum(r.values())
    raise ValueError(f"unknown best-by key {best_by!r}; choose from {sorted(BEST_BY)}")


@dataclass
class EpochRecall:
    epoch: int
    recall: Dict[str, float]  # i2t_r1 ... t2i_r10, fractions
    val_loss: Optional[float]


@dataclass
class ProtocolSummary:
    curve: List[EpochRecall]  # every evaluated epoch that has this protocol's recalls
    last: EpochRecall
    best: EpochRecall


def summarize(rows: Sequence[Mapping[str, Any]], protocol: str,
              best_by: str = "mean_r1") -> Optional[ProtocolSummary]:
    curve = []
    for row in rows:
        r = recalls(row, protocol)
        if r is not None:
            curve.append(EpochRecall(int(row["epoch"]), r, _as_float(row.get("clip_val_loss"))))
    if not curve:
        return None
    # max of (score, rsum, -epoch): ties go to the higher rsum, then to the earlier epoch
    best = max(curve, key=lambda e: (_score(e.recall, best_by), sum(e.recall.values()), -e.epoch))
    return ProtocolSummary(curve, curve[-1], best)


# ---------------------------------------------------------------------------------------------
# one run


@dataclass
class Run:
    name: str
    root: Path
    settings: Dict[str, Any]
    results: Results
    log: Optional[LogInfo]
    protocols: Dict[str, Optional[ProtocolSummary]]
    notes: List[str]

    @property
    def unlock_epochs(self) -> Dict[int, List[str]]:
        """epoch -> towers unlocked then, from params.txt, completed from the log's unlock lines."""
        out: Dict[int, List[str]] = {}
        for tower in ("image", "text"):
            at = _as_int(self.settings.get(f"unfreeze_{tower}_at_epoch"))
            if at is not None:
                out.setdefault(at, []).append(tower)
        if self.log is not None:
            for epoch, towers in self.log.unlock_epochs.items():
                if epoch not in out:
                    out[epoch] = list(towers) or ["?"]
        return out


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (
        (path / "params.txt").is_file() or (path / "out.log").is_file() or (path / "metrics.jsonl").is_file()
        or find_results(path) is not None)


def load_run(root: Path, name: str, best_by: str = "mean_r1") -> Run:
    notes: List[str] = []
    params_path = root / "params.txt"
    settings: Dict[str, Any] = {}
    if params_path.is_file():
        settings = parse_params(params_path.read_text(errors="replace"))
        given = _as_str(settings.get("name"))
        if given and given != root.name:
            notes.append(f"params.txt name is {given!r}, not the directory name")
    else:
        notes.append("no params.txt: configuration columns are empty")
    results = read_results(root)
    notes += results.notes
    log = read_log(root)
    if log is None:
        notes.append("no out.log: no trainable counts or loss curve")
    else:
        c = log.init_counts
        if c is not None and c["total"] - c["visual"] - c["text"] > max(1000, c["total"] // 100):
            rest = c["total"] - c["visual"] - c["text"]
            notes.append(f"INIT trainable total exceeds visual + text by {rest:,} "
                         "(trainable params outside both towers, or a different counting)")
    protocols = {p: summarize(results.rows, p, best_by) for p in PROTOCOLS}
    if results.rows and not any(protocols.values()):
        notes.append("results.jsonl has no retrieval recalls (neither coco_* nor image_to_text_*)")
    return Run(name, root, settings, results, log, protocols, notes)


def run_names(paths: Sequence[Path]) -> List[str]:
    """Directory names, widened with parent folders where two runs would share one."""
    resolved = [p.resolve() for p in paths]
    names = [p.name for p in resolved]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(p.parts[-depth:]) for p in resolved]
    return names


# ---------------------------------------------------------------------------------------------
# sorting


def _metric_key(protocol: str, which: str, metric: str) -> Callable[[Run], Optional[float]]:
    def get(run: Run) -> Optional[float]:
        s = run.protocols.get(protocol)
        if s is None:
            return None
        rec = getattr(s, which).recall
        return (rec["i2t_r1"] + rec["t2i_r1"]) / 2 if metric == "mean_r1" else rec[metric]
    return get


def sort_keys() -> Dict[str, Tuple[Callable[[Run], Any], bool]]:
    """--sort KEY -> (getter, descending). Strings sort ascending; numbers of the config ascending;
    recalls descending (best first). Recall keys without prefix read the COCO protocol at the last
    epoch; `best_` reads the best epoch; `pw_` / `pw_best_` the pairwise (upstream) metrics."""
    keys: Dict[str, Tuple[Callable[[Run], Any], bool]] = {
        "name": (lambda r: r.name, False),
        "model": (lambda r: _as_str(r.settings.get("model")), False),
        "lr": (lambda r: _as_float(r.settings.get("lr")), False),
        "epochs": (lambda r: _as_int(r.settings.get("epochs")), False),
        "warmup": (lambda r: _as_int(r.settings.get("warmup")), False),
        "global_batch": (lambda r: (global_batch(r.settings) or (None,) * 4)[3], False),
        "trainable": (lambda r: r.log.init_counts["total"] if r.log and r.log.init_counts else None, False),
    }
    metrics = [f"{d}_r{k}" for d in DIRECTIONS for k in KS] + ["mean_r1"]
    for prefix, protocol in (("", "coco"), ("pw_", "pairwise")):
        for m in metrics:
            keys[f"{prefix}{m}"] = (_metric_key(protocol, "last", m), True)
            keys[f"{prefix}best_{m}"] = (_metric_key(protocol, "best", m), True)
    return keys


def sort_runs(runs: List[Run], key: str) -> List[Run]:
    """Stable sort by KEY; runs without a value go last, in their given order."""
    getter, descending = sort_keys()[key]
    have = [r for r in runs if getter(r) is not None]
    missing = [r for r in runs if getter(r) is None]
    try:
        have.sort(key=getter, reverse=descending)
    except TypeError:  # mixed types in one params key: compare as text
        have.sort(key=lambda r: str(getter(r)), reverse=descending)
    return have + missing


# ---------------------------------------------------------------------------------------------
# markdown


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    return [_row(head), "| " + " | ".join("---" for _ in head) + " |"] + [_row(r) for r in rows]


def _pct3(rec: Mapping[str, float], d: str) -> str:
    return "/".join(f"{100 * rec[f'{d}_r{k}']:.2f}%" for k in KS)


def _counts(log: Optional[LogInfo]) -> str:
    if log is None or log.init_counts is None:
        return "-"
    c = log.init_counts
    return f"{c['total']:,} ({c['visual']:,} / {c['text']:,})"


def config_row(run: Run) -> List[str]:
    s = run.settings
    if not s:
        return [run.name] + ["-"] * 7 + [_counts(run.log)]
    lr, epochs = _as_float(s.get("lr")), _as_int(s.get("epochs"))
    gb = global_batch(s)
    warmup = _as_int(s.get("warmup"))
    return [
        run.name,
        _as_str(s.get("model")) or "-",
        text_tower(s),
        freeze_in_words(s),
        teacher_words(s),
        f"{_fmt_lr(lr)} / {epochs if epochs is not None else '-'}",
        warmup if warmup is not None else "-",
        f"{gb[0]} x {gb[1]} x {gb[2]} = {gb[3]}" if gb else "-",
        _counts(run.log),
    ]


CONFIG_HEAD = ["run", "model", "text tower", "freeze / unfreeze", "distill / headalign", "lr / epochs", "warmup",
               "batch x world x accum = global", "trainable @INIT: total (visual / text)"]
METRIC_HEAD = ["run", "last epoch", "I2T R@1/5/10", "T2I R@1/5/10", "best epoch", "I2T R@1/5/10 (best)",
               "T2I R@1/5/10 (best)", "clip_val_loss (last)"]


def metric_row(run: Run, protocol: str) -> List[str]:
    s = run.protocols.get(protocol)
    if s is None:
        if not run.results.rows:
            why = "no results.jsonl" if run.results.path is None else "no readable results"
        elif protocol == "coco" and run.protocols.get("pairwise") is not None:
            why = "n/a: upstream run, pairwise (upstream) metrics only"
        else:
            why = f"n/a: no {'coco_*' if protocol == 'coco' else 'image_to_text_*'} recalls"
        return [run.name, f"({why})"] + ["-"] * (len(METRIC_HEAD) - 2)
    last, best = s.last, s.best
    last_epoch = f"{last.epoch} (see notes)" if run.results.notes else last.epoch
    loss = f"{last.val_loss:.4f}" if last.val_loss is not None else "-"
    return [run.name, last_epoch, _pct3(last.recall, "i2t"), _pct3(last.recall, "t2i"),
            best.epoch, _pct3(best.recall, "i2t"), _pct3(best.recall, "t2i"), loss]


def render(runs: Sequence[Run], best_by: str = "mean_r1", sort: Optional[str] = None,
           warnings: Sequence[str] = ()) -> str:
    lines = [f"# Run comparison ({_plural(len(runs), 'run')}" + (f", sorted by {sort})" if sort else ")"), ""]
    lines += ["## Runs", ""]
    lines += _table(CONFIG_HEAD, [config_row(r) for r in runs])
    lines += ["", "Freeze: unlock epochs count completed epochs (the unlock applies from the start of that epoch); "
              "groups/layers are the last N of the tower. Trainable counts are from out.log's INIT line.", ""]
    best_note = (f"Recalls as percentages. `last` = the last evaluated epoch; `best` = the epoch with the highest "
                 f"{BEST_BY[best_by]} (ties: higher sum of all six recalls, then the earlier epoch), "
                 "chosen within each protocol.")
    lines += [f"## {PROTOCOL_TITLES['coco']}", "", best_note, ""]
    lines += _table(METRIC_HEAD, [metric_row(r, "coco") for r in runs])
    lines += ["", f"## {PROTOCOL_TITLES['pairwise']}", "", PAIRWISE_EXPLAINED, ""]
    lines += _table(METRIC_HEAD, [metric_row(r, "pairwise") for r in runs])
    notes = list(warnings) + [f"{r.name}: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plot


def loss_curve(points: Sequence[TrainPoint],
               gbatch: Optional[int]) -> Tuple[List[int], Dict[str, List[float]], Optional[int]]:
    """(steps, {loss name: values}, steps per epoch or None). Lines with `step N` use it; upstream
    lines (no step) get epoch * steps_per_epoch + samples / global batch, where steps_per_epoch =
    samples_per_epoch // global batch. Without a global batch (no params.txt) it is estimated as the
    gcd of the logged sample counters, which is a multiple of the true one."""
    if not points:
        return [], {}, None
    if gbatch is None:
        g = 0
        for p in points:
            g = math.gcd(g, p.samples)
        gbatch = g or 1
    spe = max(1, points[-1].samples_per_epoch // gbatch)
    steps = [p.step if p.step is not None else p.epoch * spe + p.samples // gbatch for p in points]
    names = sorted({n for p in points for n in p.losses})
    if "loss" in names and len(names) == 2:  # upstream's total equals its only term: plot that once
        names.remove("loss")
    series = {n: [p.losses.get(n, float("nan")) for p in points] for n in names}
    return steps, series, spe


def plot(runs: Sequence[Run], out: Path) -> None:
    """One PNG: I2T R@1 and T2I R@1 vs epoch (COCO when present, else pairwise, labelled), and the
    training losses vs step, with dotted lines at each run's unlock epochs."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), dpi=100)
    ax_i2t, ax_t2i, ax_loss = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        protocol = "coco" if run.protocols.get("coco") else "pairwise" if run.protocols.get("pairwise") else None
        unlocks = run.unlock_epochs
        if protocol is not None:
            s = run.protocols[protocol]
            label = run.name + ("" if protocol == "coco" else " (pairwise, upstream)")
            epochs = [e.epoch for e in s.curve]
            for ax, d in ((ax_i2t, "i2t"), (ax_t2i, "t2i")):
                ax.plot(epochs, [100 * e.recall[f"{d}_r1"] for e in s.curve], marker="o", markersize=3,
                        color=color, linestyle="-" if protocol == "coco" else "--", label=label)
        gb = global_batch(run.settings)
        steps, series, spe = loss_curve(run.log.points if run.log else [], gb[3] if gb else None)
        for j, (name, values) in enumerate(series.items()):
            ax_loss.plot(steps, values, color=color, linestyle=styles[j % len(styles)], linewidth=1,
                         label=f"{run.name}: {name}")
        # an unlock is marked where the run got that far (a run stopped early has no marker past its end)
        last_epoch = max([e.epoch for s in run.protocols.values() if s for e in s.curve], default=None)
        marks = [(ax_i2t, 1, last_epoch), (ax_t2i, 1, last_epoch)]
        if spe and steps:
            marks.append((ax_loss, spe, max(steps)))
        for epoch, towers in sorted(unlocks.items()):
            for ax, scale, end in marks:
                x = epoch * scale
                if end is None or x > end:
                    continue
                ax.axvline(x, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
                ax.text(x, 0.99 - 0.05 * (i % 8), "unlock " + "+".join(towers), color=color, fontsize=7,
                        rotation=90, va="top", ha="right",
                        transform=blended_transform_factory(ax.transData, ax.transAxes))
    titles = ("I2T R@1 (%) vs epoch", "T2I R@1 (%) vs epoch", "training loss vs step")
    for ax, title, xlabel in zip(axes, titles, ("epoch", "epoch", "step")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle("solid: COCO protocol; dashed: pairwise (upstream) metrics, not comparable; dotted: unlock epochs",
                 fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as e:
        raise UserError(f"cannot write --plot {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


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


if __name__ == "__main__":
    sys.exit(main())
