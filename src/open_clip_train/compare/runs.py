"""Reading a run directory: params.txt, results.jsonl, metrics.jsonl and out.log, ours or upstream's.
Missing files and half-written lines become notes, never errors."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..run_outputs import parse_jsonl
from .summary import PROTOCOLS, ProtocolSummary, summarize
from .words import as_int, as_str, plural

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
        notes.append(f"{where}: {plural(without_epoch, 'row')} without an epoch (skipped)")
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


_COUNTS = r"visual=(\d+), text=(\d+)(?:, video=(\d+))?, total=(\d+)"
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
            counts = dict(zip(("visual", "text", "total"), map(int, m.group(3, 4, 6))))
            if m.group(5) is not None:  # a video run's frame aggregation
                counts["video"] = int(m.group(5))
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
            at = as_int(self.settings.get(f"unfreeze_{tower}_at_epoch"))
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
        given = as_str(settings.get("name"))
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
        rest = c["total"] - c["visual"] - c["text"] - c.get("video", 0) if c is not None else 0
        if c is not None and rest > max(1000, c["total"] // 100):
            notes.append(f"INIT trainable total exceeds visual + text by {rest:,} "
                         "(trainable params outside both towers, or a different counting)")
    protocols = {p: summarize(results.rows, p, best_by) for p in PROTOCOLS}
    zeroshot_only = any(k.endswith(("-top1", "-top5")) and "zeroshot" in k for r in results.rows for k in r)
    if results.rows and not any(protocols.values()) and not zeroshot_only:
        notes.append("results.jsonl has no retrieval recalls (neither coco_*, image_to_text_* nor msrvtt_*)")
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
