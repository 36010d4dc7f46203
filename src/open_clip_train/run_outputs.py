"""What a run leaves behind, in upstream's places and formats:

    <logs>/<name>/out.log                    text log (upstream's line format), for people
    <logs>/<name>/metrics.jsonl              one JSON object per logging step, for tools
    <logs>/<name>/params.txt                 one `name: value` line per resolved setting, sorted
    <logs>/<name>/provenance.json            git SHA, package versions, host, command line
    <logs>/<name>/checkpoints/epoch_N.pt     checkpoints
    <logs>/<name>/checkpoints/results.jsonl  one JSON object per evaluation
    <logs>/<name>/tensorboard/               with --report-to tensorboard

Only rank 0 writes files (every rank logs to its own stderr). `--log-dir none` writes nothing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


LOG_FORMAT = "%(asctime)s | %(levelname)s | %(message)s"
DATE_FORMAT = "%Y-%m-%d,%H:%M:%S"
PACKAGES = ("torch", "torchvision", "open_clip_torch", "timm", "transformers", "safetensors", "numpy")


@dataclass
class RunPaths:
    root: Path

    @property
    def log(self) -> Path:
        return self.root / "out.log"

    def rank_log(self, rank: int) -> Path:
        """--log-local: a node's local rank 0 logs here (upstream's `out-<rank>`)."""
        return self.root / f"out-{rank}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def params(self) -> Path:
        return self.root / "params.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def results(self) -> Path:
        return self.checkpoints / "results.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def default_name(model: str, lr: float, batch_size: int, workers: int, precision: str) -> str:
    date = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return "-".join([date, f"model_{model.replace('/', '-')}", f"lr_{lr}", f"b_{batch_size}", f"j_{workers}", f"p_{precision}"])


def run_paths(logs: Optional[str], name: str) -> Optional[RunPaths]:
    """Where the run writes; None for `--log-dir none` (upstream: store nothing)."""
    if not logs or str(logs).lower() == "none":
        return None
    return RunPaths(Path(logs) / name)


def run_dir_problem(paths: Optional[RunPaths], resuming: bool) -> Optional[str]:
    """Why this run may not use `paths` (an earlier run's log is there), or None."""
    if paths is not None and paths.log.exists() and not resuming:
        return (f"experiment {paths.root} already exists; use --name to start a new one "
                "or --resume latest to continue it")
    return None


def log_file(paths: Optional[RunPaths], rank: int, local_rank: int, log_local: bool) -> Optional[Path]:
    """The file this process logs to: out.log on rank 0; with --log-local also `out-<rank>` on every
    other node's local rank 0 (upstream logs on each local master then; rank 0 keeps out.log here,
    the file the rest of this package reads)."""
    if paths is None:
        return None
    if rank == 0:
        return paths.log
    return paths.rank_log(rank) if log_local and local_rank == 0 else None


def prepare_run_dir(paths: Optional[RunPaths]) -> None:
    if paths is not None:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)


def setup_logging(log_file: Optional[Path], level: int = logging.INFO, rank: int = 0) -> None:
    """Upstream's format on stderr for every rank, and into out.log for rank 0."""
    fmt = LOG_FORMAT if rank == 0 else f"%(asctime)s | rank {rank} | %(levelname)s | %(message)s"
    formatter = logging.Formatter(fmt, datefmt=DATE_FORMAT)
    root = logging.getLogger()
    teardown_logging()
    root.setLevel(level)
    handlers: List[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        _end_torn_line(log_file)
        handlers.append(logging.FileHandler(log_file))  # appends: a resumed run continues the log
    for h in handlers:
        h.setFormatter(formatter)
        h._open_clip_train = True  # so a second main() in one process does not double-log
        root.addHandler(h)


def _end_torn_line(path: Path) -> None:
    """A run killed mid-write can leave out.log without its last newline; end that line so the
    next run's first line starts on its own."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def teardown_logging() -> None:
    """Remove (and close) the handlers `setup_logging` added, so that `main()` called from a
    test or notebook leaves no file open and no handler writing to a stale stream."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_open_clip_train", False):
            root.removeHandler(h)
            h.close()


def write_params(path: Path, settings: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        for name in sorted(settings):
            f.write(f"{name}: {settings[name]}\n")


def append_result(path: Path, row: Dict[str, Any]) -> None:
    _append_row(path, row)


def append_metrics(path: Path, row: Dict[str, Any]) -> None:
    _append_row(path, row)


def _append_row(path: Path, row: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(jsonable(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def jsonable(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers, non-finite floats as strings (JSON has none),
    through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def parse_jsonl(text: str) -> Tuple[List[Dict[str, Any]], List[Tuple[int, str]]]:
    """JSON-lines text -> (the JSON objects, [(line number, line)] of lines that are not one:
    a write cut short by a kill). Blank lines are skipped. The one reader of results.jsonl and
    metrics.jsonl, for the trainer and the compare / results_table tools."""
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append((n, line))
    return rows, bad


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The rows of a JSON-lines file (none when it does not exist); a line that is not a JSON
    object is skipped with a warning."""
    if not Path(path).exists():
        return []
    rows, bad = parse_jsonl(Path(path).read_text(errors="replace"))
    for n, line in bad:
        logging.warning(f"{path}: dropping half-written line {n} ({line[:60]!r})")
    return rows


read_results = read_jsonl


def drop_results_after(path: Path, epoch: int) -> None:
    """Before training from `epoch` on (0 for a fresh start, which drops every row), drop rows
    of later epochs (and half-written lines), so results.jsonl keeps one row per evaluated epoch."""
    _keep_rows(path, lambda r: epoch > 0 and r.get("epoch", 0) <= epoch)


def drop_metrics_after(path: Path, step: int) -> None:
    """Before training from global step `step` on: drop the rows of later steps (a resumed run
    logs them again) and half-written lines."""
    _keep_rows(path, lambda r: isinstance(r.get("step"), int) and r["step"] <= step)


def _keep_rows(path: Path, keep) -> None:
    if not Path(path).exists():
        return
    rows = [r for r in read_jsonl(path) if keep(r)]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def write_provenance(path: Path, argv: List[str]) -> None:
    Path(path).write_text(json.dumps(provenance(argv), indent=2) + "\n")


def provenance(argv: List[str]) -> Dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {
        "git_sha": sha or None,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": versions,
        "argv": argv,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


class Reporters:
    """tensorboard / wandb sinks for scalars; a no-op when neither is requested (or not rank 0)."""

    def __init__(self, report_to: List[str], paths: RunPaths, name: str, config: Dict[str, Any],
                 is_master: bool, wandb_project: str = "open-clip", wandb_notes: str = "", resume: bool = False):
        self.tb = None
        self.wandb = None
        if not is_master:
            return
        if "tensorboard" in report_to or "all" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            paths.tensorboard.mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(str(paths.tensorboard))
        if "wandb" in report_to or "all" in report_to:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=name, id=name, notes=wandb_notes,
                                    config=config, dir=str(paths.root), resume="auto" if resume else None)

    @property
    def active(self) -> bool:
        return self.tb is not None or self.wandb is not None

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(values, step=step), step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
