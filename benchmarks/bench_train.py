#!/usr/bin/env python3
"""Training throughput and peak memory: this repo's trainer vs upstream's (open_clip_torch 3.3.0).

    python benchmarks/bench_train.py            # default: convnextv2_tiny_cliptext-512, ~14 min on 2 idle CPU cores
    python benchmarks/bench_train.py --quick    # one repeat, fewer steps (~6 min)
    python benchmarks/bench_train.py --tiny     # tiny-convnext-cliptext smoke check (~3 min)

Both trainers run as `python -m open_clip_train.main`, ours from the repo's .venv, upstream's from a
separate virtualenv (benchmarks/setup_upstream_env.sh) because both packages are called
`open_clip_train`. Same data (a TSV of rendered images, one caption each), same model config, batch
size, precision, optimiser settings and dataloader workers. Each setting runs the two trainers
alternately (A B B A ...) and reports medians.

Measured, the same way for both, by this driver (not by the trainers' own clocks):
  * samples/s: both trainers log one line per step (--log-every-n-steps 1); the driver timestamps
    each line as it arrives on the pipe and takes batch * (n - k) / (t_n - t_k) over steps k..n,
    i.e. skipping the first k steps as warm-up. The trainers' self-reported per-step `Batch (t)`
    (both print it; same meaning: wall time from the end of one step to the end of the next) is
    kept as a cross-check.
  * peak RSS: ru_maxrss of the trainer from os.wait4 (the largest single process of its tree:
    the training process), plus the peak of the whole tree's summed RSS (training process +
    dataloader workers) sampled from /proc every 0.2 s.

Writes benchmarks/results.json (everything, per run) and benchmarks/results.md (the summary).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_WORK = BENCH / "work"
MODEL_CONFIG_DIR = REPO / "src" / "open_clip_train" / "models" / "model_configs"
STEP_RE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
BATCH_T_RE = re.compile(r"Batch \(t\): ([0-9.]+)")
OURS_PARAMS_RE = re.compile(r"trainable params \(INIT\): visual=(\d+), text=(\d+), total=(\d+)")
# our trainer's own lines about speed decisions, kept with each run's results
OURS_NOTE_RE = re.compile(r"(image trunk fully frozen: .*|host allocator: .*|unlock at epoch .*|text tower: .*)$")

# setting -> (our flags, upstream's flags). Upstream's --lock-text asserts on the CLIP text tower
# without --lock-text-freeze-layer-norm, so lock-both passes it to both (the same trainable set).
# after-unlock: ours locks the trunk for epoch 0 and unlocks it whole at epoch 1; measured after the
# unlock, it trains the same parameters as upstream's full fine-tune, which is its comparison.
SETTINGS = {
    "full": ([], []),
    "lock-image": (["--lock-image"], ["--lock-image"]),
    "lock-both": (["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm"],
                  ["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm"]),
    "after-unlock": (["--lock-image", "--unfreeze-image-at-epoch", "1", "--unfreeze-new-lr-scale", "1"], []),
    # ours trains on the frozen towers' outputs, computed once at start (a fresh cache per run, so
    # start-up includes the extraction); upstream has no such cache (nor --no-augment: its train
    # transform is a RandomResizedCrop at scale 0.9-1, ours a resize and centre crop, the same cost).
    "lock-both-cache": (["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm", "--no-augment",
                         "--frozen-feature-cache", "{run_dir}/frozen-cache"],
                        ["--lock-image", "--lock-text", "--lock-text-freeze-layer-norm"]),
}


@dataclass
class Profile:
    """What one invocation benchmarks."""
    model: str
    image_size: int
    batch_size: int
    settings: list[str]  # keys of SETTINGS
    steps: dict[str, int]  # steps measured per run (the trainer is stopped after them), per setting
    skip: int  # warm-up steps excluded from the throughput window
    repeats: int
    workers: int
    precision: str = "fp32"
    # Both trainers are told to run this many epochs and stopped after `steps`: a run's defaults
    # (ours: whether a frozen trunk is worth compiling) see the length of a real run, not of the
    # few steps measured. One epoch = `steps` batches, except after-unlock's (epoch_steps).
    epochs: int = 40
    epoch_steps: dict[str, int] = field(default_factory=dict)
    skip_for: dict[str, int] = field(default_factory=dict)  # per-setting override of skip

    def skip_of(self, setting: str) -> int:
        return self.skip_for.get(setting, self.skip)


# Locked settings skip 5 steps: ours times its frozen trunk on steps 1-3 and compiles it (when it
# pays off) during step 4. after-unlock: epoch 0 is 4 locked steps, measured from step 6 on.
_ALL = ["full", "lock-image", "lock-both", "after-unlock"]
_SKIP = {"lock-image": 5, "lock-both": 5, "after-unlock": 5, "lock-both-cache": 5}
PROFILES = {
    # On 2 idle cores: ~17-25 s/step full fine-tune, ~4-8 s/step locked, ~40 s start-up per run.
    "default": Profile("convnextv2_tiny_cliptext-512", 224, 32, _ALL,
                       {"full": 6, "lock-image": 12, "lock-both": 12, "after-unlock": 9, "lock-both-cache": 30},
                       skip=2, repeats=2,
                       workers=1, epoch_steps={"after-unlock": 4}, skip_for=_SKIP),
    "quick": Profile("convnextv2_tiny_cliptext-512", 224, 32, _ALL,
                     {"full": 5, "lock-image": 10, "lock-both": 10, "after-unlock": 8, "lock-both-cache": 30},
                     skip=2, repeats=1,
                     workers=1, epoch_steps={"after-unlock": 4}, skip_for=_SKIP),
    "tiny": Profile("tiny-convnext-cliptext", 64, 32, _ALL,
                    {"full": 30, "lock-image": 30, "lock-both": 30, "after-unlock": 30, "lock-both-cache": 30},
                    skip=5, repeats=2,
                    workers=1, epoch_steps={"after-unlock": 10}, skip_for={"after-unlock": 12}),
}


# ------------------------------------------------------------------------------------- environment

def ours_python() -> Path:
    env = os.environ.get("OURS_PYTHON")
    if env:
        return Path(env)
    venv = REPO / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def upstream_python(venv: str | None) -> Path:
    root = Path(venv or os.environ.get("UPSTREAM_VENV") or BENCH / ".venv-upstream")
    py = root / "bin" / "python"
    if not py.exists():
        sys.exit(f"no upstream virtualenv at {root}: run `bash benchmarks/setup_upstream_env.sh {root}` first "
                 f"(or set UPSTREAM_VENV / pass --upstream-venv)")
    return py


THREADS: int | None = None  # --threads: OMP/MKL threads for both trainers (None: torch's default)
DEVICE = "cpu"  # --device: cpu hides every GPU from both trainers; cuda passes --device cuda to both


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    env.pop("PYTHONPATH", None)  # nothing may change which open_clip_train each interpreter finds
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    if DEVICE == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


PROBE = r"""
import json, sys
import torch, open_clip, timm, numpy, PIL
import open_clip_train
info = {"python": sys.version.split()[0], "torch": torch.__version__, "open_clip": open_clip.__version__,
        "timm": timm.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
        "torch_threads": torch.get_num_threads(), "trainer": open_clip_train.__file__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
model_name = sys.argv[1] if len(sys.argv) > 1 else ""
if model_name:
    if not model_name.startswith("local-dir:"):
        import open_clip_train.models  # registers our configs with open_clip
    model = open_clip.create_model(model_name, pretrained=None, pretrained_image=False)
    def counts(m):
        c = {"visual": 0, "text": 0, "total": 0}
        for n, p in m.named_parameters():
            if not p.requires_grad:
                continue
            c["total"] += p.numel()
            if n.startswith("visual."):
                c["visual"] += p.numel()
            elif n not in ("logit_scale", "logit_bias"):
                c["text"] += p.numel()
        return c
    info["params_full"] = counts(model)
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    info["params_lock_image"] = counts(model)
print("PROBE " + json.dumps(info))
"""


def probe(python: Path, model_arg: str = "") -> dict:
    out = subprocess.run([str(python), "-c", PROBE, model_arg], capture_output=True, text=True, env=child_env(),
                         cwd=tempfile.gettempdir(), timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    sys.exit(f"probe with {python} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def cuda_available(python: Path) -> bool:
    out = subprocess.run([str(python), "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                         text=True, env=child_env(), timeout=300)
    return out.stdout.strip().endswith("True")


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "mem_gib": mem_gib, "platform": platform.platform()}


# ---------------------------------------------------------------------------------------------- data

def make_data(work: Path, python: Path, num_images: int, image_size: int) -> Path:
    """demo_data images (COCO layout) -> TSV with absolute paths, one caption (the first) per image."""
    root = work / f"data-{image_size}px-{num_images}"
    tsv = root / "train.tsv"
    if tsv.exists():
        return tsv
    if root.exists():
        shutil.rmtree(root)
    subprocess.run([str(python), "-m", "open_clip_train.demo_data", str(root), "--num-train", str(num_images),
                    "--num-val", "1", "--image-size", str(image_size), "--seed", "0"],
                   check=True, env=child_env(), cwd=str(work))
    coco = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    first = {}
    for ann in coco["annotations"]:
        first.setdefault(ann["image_id"], ann["caption"])
    tmp = tsv.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        w.writerow(["filepath", "title"])
        for img in coco["images"]:
            caption = " ".join(first[img["id"]].split())  # no tabs / newlines
            w.writerow([str((root / "train2017" / img["file_name"]).resolve()), caption])
    tmp.rename(tsv)
    return tsv


def caption_tokens(tsv: Path, batch_size: int) -> dict:
    """CLIP-tokenizer lengths (with start/end tokens) of the captions, and the longest per batch:
    the text tower's work with --trim-text-padding depends on it (context length 77 without)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    with tsv.open(encoding="utf-8") as f:
        lengths = [len(tok.encode(row["title"])) + 2 for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    batch_max = [max(lengths[i:i + batch_size]) for i in range(0, len(lengths) - batch_size + 1, batch_size)]
    return {"median": statistics.median(lengths), "max": max(lengths),
            "batch_max_median": statistics.median(batch_max) if batch_max else max(lengths)}


def upstream_model_dir(work: Path, model: str) -> Path:
    """Upstream does not know our model names: the same JSON, as an open_clip 'local-dir:' model."""
    cfg = json.loads((MODEL_CONFIG_DIR / f"{model}.json").read_text())
    d = work / "upstream-models" / model
    d.mkdir(parents=True, exist_ok=True)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=2))
    return d


# ---------------------------------------------------------------------------------------------- runs

@dataclass
class RunResult:
    impl: str
    setting: str
    repeat: int
    order: int
    steps: int
    rc: int
    wall_s: float
    startup_s: float | None  # launch -> first step logged
    samples_per_s: float | None  # driver clock, steps skip..n
    samples_per_s_median_step: float | None  # batch / median per-step interval (driver clock)
    self_reported_batch_t: float | None  # median of the trainer's own Batch (t), same steps
    peak_rss_mib: float  # ru_maxrss of the trainer (largest process in its tree)
    peak_gpu_mib: float | None  # --device cuda: peak GPU memory of the tree, sampled from nvidia-smi
    peak_tree_rss_mib: float  # sampled peak of summed RSS over the process tree
    cpu_s_per_step: float | None  # trainer tree's user+sys CPU seconds per step, same window
    sys_s_per_step: float | None  # of which system (kernel) time: mostly page faults on fresh memory
    minor_faults_per_step: float | None
    other_load_cores: float | None  # CPU used by other processes during the window, in cores
    load_before_cores: float | None = None  # other processes' load just before the run
    waited_s: float = 0.0  # time spent waiting for the machine to quieten before the run
    step_intervals_s: list[float] = field(default_factory=list)
    trainable_params: dict | None = None
    trainer_notes: list[str] = field(default_factory=list)  # ours: compile decision, allocator, unlocks
    log: str = ""


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _tree_pids(pid: int) -> list[int]:
    pids, seen = [pid], []
    while pids:
        p = pids.pop()
        seen.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                pids.extend(int(k) for k in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return seen


def _tree_rss_kib(pid: int) -> int:
    total = 0
    for p in _tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return total


def _gpu_mib(pids: list[int]) -> float:
    """GPU memory the driver reports for these processes (nvidia-smi: the caching allocator's reserve
    plus the CUDA context, the same measure for both trainers); 0 when nothing is on a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0.0
    wanted, total = set(pids), 0.0
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in wanted:
            total += float(mib or 0)
    return total


def _tree_cpu(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of the live process tree (trainer + dataloader workers)."""
    user = system = faults = 0
    for p in _tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            faults += int(fields[7])
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return user / CLK_TCK, system / CLK_TCK, faults


def _system_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, everyone's processes)."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    guest = sum(vals[8:10]) if len(vals) > 9 else 0  # already counted in user / nice
    return (sum(vals) - idle - guest) / CLK_TCK


def other_load(seconds: float = 2.0) -> float:
    """Cores' worth of CPU used by everything else on the machine (this driver is idle meanwhile)."""
    b0, t0 = _system_busy_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (_system_busy_s() - b0) / (time.perf_counter() - t0))


def wait_for_quiet(threshold: float, max_wait: float) -> tuple[float, float]:
    """Wait (up to max_wait s) until other processes use less than `threshold` cores; returns
    (the last load measured, seconds waited)."""
    t0 = time.perf_counter()
    load = other_load()
    while load > threshold and time.perf_counter() - t0 < max_wait:
        load = other_load(5.0)
    return load, time.perf_counter() - t0


def run_trainer(impl: str, python: Path, model_arg: str, setting: str, tsv: Path, prof: Profile, run_dir: Path,
                repeat: int, order: int, steps: int) -> RunResult:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    args = [
        str(python), "-m", "open_clip_train.main",
        "--model", model_arg,
        "--dataset-type", "csv", "--train-data", str(tsv),
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
        "--batch-size", str(prof.batch_size), "--precision", prof.precision, "--epochs", str(prof.epochs),
        "--lr", "5e-4", "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8", "--wd", "0.2", "--warmup", "2",
        "--workers", str(prof.workers), "--log-every-n-steps", "1", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--seed", "0",
        "--name", f"{impl}-{setting}-r{repeat}",
    ]
    # --logs none: both trainers save a checkpoint at the last epoch whatever --save-frequency says;
    # 'none' stores nothing at all (the driver keeps the console log). python -m, not torchrun, so
    # upstream's --logs spelling works for both.
    args += ["--logs", "none"]
    if DEVICE != "cpu":
        args += ["--device", DEVICE]
    args += [a.format(run_dir=run_dir) for a in SETTINGS[setting][0 if impl == "ours" else 1]]
    return measure(args, run_dir, impl, setting, repeat, order, steps, prof.batch_size, prof.skip_of(setting),
                   stop_after=True)


def measure(args: list[str], run_dir: Path, impl: str, setting: str, repeat: int, order: int, steps: int,
            batch_size: int, skip: int, stop_after: bool = False) -> RunResult:
    """Run one trainer command line (logging every step) in run_dir and measure it: throughput
    over steps skip+1..n by the driver's clock, CPU time, page faults, RSS, other load. With
    stop_after, the trainer is killed once it has logged `steps` steps (its run is longer)."""
    (run_dir / "cmd.txt").write_text(" ".join(repr(a) if a in ("", "\t") else a for a in args) + "\n")

    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(run_dir),
                            env=child_env(), text=True, bufsize=1)
    peak_tree, peak_gpu = [0], [0.0]
    done = threading.Event()

    def sample() -> None:
        n = 0
        while not done.is_set():
            peak_tree[0] = max(peak_tree[0], _tree_rss_kib(proc.pid))
            if DEVICE == "cuda" and n % 5 == 0:  # nvidia-smi takes tens of ms: once a second
                peak_gpu[0] = max(peak_gpu[0], _gpu_mib(_tree_pids(proc.pid)))
            n += 1
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[str] = []
    step_times: list[float] = []
    step_cpu: list[tuple[float, float, int]] = []  # trainer tree (user s, sys s, faults) at each step line
    step_busy: list[float] = []  # machine-wide busy CPU seconds at each step line
    batch_t: list[float] = []
    log_path = run_dir / "stdout.log"
    with log_path.open("w") as log:
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            lines.append(line)
            if STEP_RE.search(line):
                step_times.append(now)
                step_cpu.append(_tree_cpu(proc.pid))
                step_busy.append(_system_busy_s())
                m = BATCH_T_RE.search(line)
                batch_t.append(float(m.group(1)) if m else float("nan"))
                if stop_after and len(step_times) == steps:
                    for pid in reversed(_tree_pids(proc.pid)):  # loader workers, then the trainer
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    break
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    if stop_after and rc == -signal.SIGKILL and len(step_times) == steps:
        rc = 0  # stopped by us, as planned
    trainer_notes = [m.group(1).strip() for m in (OURS_NOTE_RE.search(x.rstrip()) for x in lines) if m]

    params = None
    for line in lines:
        m = OURS_PARAMS_RE.search(line)
        if m:
            params = {"visual": int(m.group(1)), "text": int(m.group(2)), "total": int(m.group(3))}
            break
    intervals = [b - a for a, b in zip(step_times, step_times[1:])]
    window = step_times[skip - 1:]  # end of step `skip` .. end of the last step
    sps = sps_med = bt = cpu_step = sys_step = faults_step = other = None
    if rc == 0 and len(step_times) == steps and len(window) >= 2:
        measured = len(window) - 1
        span = window[-1] - window[0]
        sps = batch_size * measured / span
        (u1, s1, f1), (u0, s0, f0) = step_cpu[-1], step_cpu[skip - 1]
        cpu = (u1 - u0) + (s1 - s0)
        cpu_step, sys_step, faults_step = cpu / measured, (s1 - s0) / measured, (f1 - f0) / measured
        other = max(0.0, (step_busy[-1] - step_busy[skip - 1] - cpu) / span)
        sps_med = batch_size / statistics.median(intervals[skip - 1:])
        bt = statistics.median(batch_t[skip:])
    result = RunResult(
        impl=impl, setting=setting, repeat=repeat, order=order, steps=len(step_times), rc=rc, wall_s=round(wall, 2),
        startup_s=round(step_times[0] - t0, 2) if step_times else None,
        samples_per_s=sps, samples_per_s_median_step=sps_med, self_reported_batch_t=bt,
        peak_rss_mib=round(usage.ru_maxrss / 1024, 1), peak_tree_rss_mib=round(peak_tree[0] / 1024, 1),
        peak_gpu_mib=round(peak_gpu[0], 1) if DEVICE == "cuda" else None,
        cpu_s_per_step=round(cpu_step, 3) if cpu_step is not None else None,
        sys_s_per_step=round(sys_step, 3) if sys_step is not None else None,
        minor_faults_per_step=round(faults_step) if faults_step is not None else None,
        other_load_cores=round(other, 2) if other is not None else None,
        step_intervals_s=[round(x, 3) for x in intervals], trainable_params=params, trainer_notes=trainer_notes,
        log=str(log_path.relative_to(REPO)) if log_path.is_relative_to(REPO) else str(log_path),
    )
    if rc != 0 or len(step_times) != steps:
        tail = "".join(lines[-40:])
        raise RuntimeError(f"{impl} {setting} run failed (rc={rc}, {len(step_times)}/{steps} steps logged); "
                           f"log {log_path}:\n{tail}")
    return result


# ------------------------------------------------------------------------------------------- summary

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs: list[RunResult], prof: Profile) -> list[dict]:
    rows = []
    for setting in prof.settings:
        row = {"setting": setting}
        for impl in ("ours", "upstream"):
            rs = [r for r in runs if r.setting == setting and r.impl == impl]
            row[impl] = {
                "runs": len(rs),
                "samples_per_s": _median([r.samples_per_s for r in rs]),
                "samples_per_s_all": [round(r.samples_per_s, 3) for r in rs],
                "samples_per_s_median_step": _median([r.samples_per_s_median_step for r in rs]),
                "self_reported_batch_t_s": _median([r.self_reported_batch_t for r in rs]),
                "peak_rss_mib": _median([r.peak_rss_mib for r in rs]),
                "peak_tree_rss_mib": _median([r.peak_tree_rss_mib for r in rs]),
                "peak_gpu_mib": _median([r.peak_gpu_mib for r in rs]),
                "startup_s": _median([r.startup_s for r in rs]),
                "cpu_s_per_step": _median([r.cpu_s_per_step for r in rs]),
                "sys_s_per_step": _median([r.sys_s_per_step for r in rs]),
                "minor_faults_per_step": _median([r.minor_faults_per_step for r in rs]),
                "samples_per_cpu_s": _median([prof.batch_size / r.cpu_s_per_step for r in rs if r.cpu_s_per_step]),
                "other_load_cores_max": max((r.other_load_cores or 0.0) for r in rs) if rs else None,
            }
        o, u = row["ours"], row["upstream"]
        row["ratio_ours_over_upstream"] = {
            k: (o[k] / u[k] if o[k] and u[k] else None)
            for k in ("samples_per_s", "samples_per_s_median_step", "samples_per_cpu_s", "peak_rss_mib",
                      "peak_tree_rss_mib", "peak_gpu_mib")
        }
        rows.append(row)
    return rows


def write_markdown(path: Path, meta: dict, rows: list[dict], runs: list[RunResult], prof: Profile) -> None:
    f = lambda x, d=1: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    m, cfg = meta["machine"], meta["config"]
    out = [
        "# Training throughput: ours vs upstream open_clip_train 3.3.0",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"* Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m['mem_gib']} GiB RAM, {m['platform']}; "
        f"device: {cfg['device']}" + (f" ({meta['ours']['cuda']})" if cfg["device"] == "cuda" else ""),
        f"* Ours: torch {meta['ours']['torch']}, open_clip {meta['ours']['open_clip']}, timm {meta['ours']['timm']}, "
        f"{meta['ours']['torch_threads']} torch threads, trainer `{meta['ours']['trainer_rel']}`",
        f"* Upstream: torch {meta['upstream']['torch']}, open_clip {meta['upstream']['open_clip']}, "
        f"timm {meta['upstream']['timm']}, {meta['upstream']['torch_threads']} torch threads, "
        f"trainer `{meta['upstream']['trainer_rel']}`",
        f"* Model `{cfg['model']}` (upstream: the same JSON via `local-dir:`), {cfg['image_size']} px, batch "
        f"{cfg['batch_size']}, {cfg['precision']}, AdamW lr 5e-4, {cfg['workers']} dataloader worker(s), 1 process, "
        f"CSV data (rendered scenes, one caption each: {cfg['caption_tokens']['median']:g} tokens median, "
        f"{cfg['caption_tokens']['max']} max, a batch's longest {cfg['caption_tokens']['batch_max_median']:g} median; "
        f"COCO captions are of the same order, ~10-20 tokens; the context is 77)",
        f"* Steps per run (measured window after the warm-up steps): "
        f"{', '.join(f'{k} {v} ({prof.skip_of(k) + 1}..{v})' for k, v in cfg['steps'].items() if k in cfg['settings'])}; "
        f"both trainers are launched for {cfg['epochs']} epochs and stopped after those steps, so each sees "
        f"a long run's defaults; timed by the driver from log-line arrival; {cfg['repeats']} run(s) per trainer "
        f"and setting, alternating; medians shown.",
        "* Settings (same flags for both, each trainer's defaults otherwise): "
        + "; ".join(f"`{k}`: ours `{' '.join(SETTINGS[k][0]) or '(none)'}`, upstream `{' '.join(SETTINGS[k][1]) or '(none)'}`"
                    for k in cfg["settings"]) + ". after-unlock is measured after the unlock at epoch 1 "
        f"(epoch length {prof.epoch_steps.get('after-unlock', '-')} steps), against upstream's full fine-tune "
        "(the same trainable set).",
        "",
        "| setting | ours samples/s | upstream samples/s | ours/upstream | ours peak RSS MiB | upstream peak RSS MiB "
        "| ours/upstream | ours tree RSS MiB | upstream tree RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        o, u, q = r["ours"], r["upstream"], r["ratio_ours_over_upstream"]
        out.append(f"| {r['setting']} | {f(o['samples_per_s'], 2)} | {f(u['samples_per_s'], 2)} | "
                   f"{f(q['samples_per_s'], 3)} | {f(o['peak_rss_mib'], 0)} | {f(u['peak_rss_mib'], 0)} | "
                   f"{f(q['peak_rss_mib'], 3)} | {f(o['peak_tree_rss_mib'], 0)} | {f(u['peak_tree_rss_mib'], 0)} |")
    if cfg["device"] == "cuda":
        out += ["", "Peak GPU memory (nvidia-smi, per process tree: allocator reserve + CUDA context), MiB:", "",
                "| setting | ours | upstream | ours/upstream |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {r['setting']} | {f(r['ours']['peak_gpu_mib'], 0)} | {f(r['upstream']['peak_gpu_mib'], 0)} | "
                f"{f(r['ratio_ours_over_upstream']['peak_gpu_mib'], 3)} |" for r in rows]
    out += [
        "",
        "Cross-checks (medians): samples/s from the median per-step interval; samples per CPU-second of the "
        "trainer's process tree (less sensitive to other load on the machine), the part of it spent in the kernel "
        "and minor page faults (fresh memory being mapped); each trainer's own `Batch (t)`; "
        "start-up (launch to first step); the most CPU other processes used during a measured window "
        "(in cores: anything well above 0 means the wall-clock numbers are contaminated).",
        "",
        "| setting | impl | samples/s (median step) | samples/CPU-s | CPU-s/step | of which sys | page faults/step "
        "| self-reported Batch (t) s | start-up s | other load (max, cores) | all runs samples/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        for impl in ("ours", "upstream"):
            x = r[impl]
            out.append(f"| {r['setting']} | {impl} | {f(x['samples_per_s_median_step'], 2)} | "
                       f"{f(x['samples_per_cpu_s'], 2)} | {f(x['cpu_s_per_step'], 2)} | {f(x['sys_s_per_step'], 2)} | "
                       f"{f(x['minor_faults_per_step'], 0)} | "
                       f"{f(x['self_reported_batch_t_s'], 3)} | {f(x['startup_s'], 1)} | "
                       f"{f(x['other_load_cores_max'], 2)} | "
                       f"{', '.join(f'{v:.2f}' for v in x['samples_per_s_all'])} |")
    out += ["", "Ratios ours/upstream: " + "; ".join(
        f"{r['setting']}: samples/s x{f(r['ratio_ours_over_upstream']['samples_per_s'], 3)}, "
        f"samples/CPU-s x{f(r['ratio_ours_over_upstream']['samples_per_cpu_s'], 3)}, "
        f"peak RSS x{f(r['ratio_ours_over_upstream']['peak_rss_mib'], 3)}, "
        f"tree RSS x{f(r['ratio_ours_over_upstream']['peak_tree_rss_mib'], 3)}" for r in rows)]
    check = meta.get("model_check", {})
    if check:
        out += ["", f"Model parity: {check['summary']}"]
    if meta.get("notes"):
        out += ["", "Notes:", ""] + [f"* {n}" for n in meta["notes"]]
    ours_notes = {}
    for r in sorted(runs, key=lambda r: r.order):
        if r.impl == "ours" and r.trainer_notes:
            ours_notes.setdefault(r.setting, r.trainer_notes)
    if ours_notes:
        out += ["", "Our trainer's speed decisions, from its log (first run of each setting):", ""]
        out += [f"* {k}: " + "; ".join(f"`{n}`" for n in v) for k, v in ours_notes.items()]
        slow = [f"{r.setting}/{r.impl}#{r.repeat}: {max(r.step_intervals_s):.1f} s" for r in runs
                if r.impl == "ours" and any("compiling it" in n for n in r.trainer_notes) and r.step_intervals_s]
        if slow:
            out += ["", "One-off compile (the longest step interval of runs that compiled, inside the warm-up): "
                    + ", ".join(slow)]
    out += ["", "Run order: " + ", ".join(f"{r.setting}/{r.impl}#{r.repeat}" for r in sorted(runs, key=lambda r: r.order)),
            "", "Per-run details (step intervals, logs) are in `results.json`.", ""]
    path.write_text("\n".join(out))


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one repeat, fewer steps (~6 min)")
    mode.add_argument("--tiny", action="store_true", help="tiny-convnext-cliptext smoke check (~3 min; writes results-tiny.*)")
    ap.add_argument("--settings", default=None,
                    help=f"comma list of {','.join(SETTINGS)} (default: {','.join(_ALL)})")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default: GPUs hidden from both trainers) or cuda (--device cuda for both, peak GPU "
                         "memory sampled; stops if torch sees no GPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="batch size of both trainers (default: the profile's)")
    ap.add_argument("--precision", default=None, help="--precision of both trainers, e.g. amp (default: fp32)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per trainer and setting")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (all settings)")
    ap.add_argument("--skip", type=int, default=None, help="warm-up steps left out of the throughput window")
    ap.add_argument("--workers", type=int, default=None, help="dataloader workers (both trainers)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both trainers (OMP_NUM_THREADS; default: torch's choice, all cores)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="before each run, wait until other processes use fewer cores than this (default 0.3)")
    ap.add_argument("--max-wait", type=float, default=60.0,
                    help="longest wait for a quiet machine before each run, seconds (default 60; 0: never wait)")
    ap.add_argument("--upstream-venv", default=None,
                    help="upstream virtualenv (default: $UPSTREAM_VENV or benchmarks/.venv-upstream)")
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK), help="data and run logs (default: benchmarks/work)")
    ap.add_argument("--out", default=None,
                    help="results basename; writes BASE.json and BASE.md (default: benchmarks/results, "
                         "benchmarks/results-tiny with --tiny)")
    a = ap.parse_args(argv)

    prof = PROFILES["tiny" if a.tiny else "quick" if a.quick else "default"]
    if a.settings:
        prof.settings = [s.strip() for s in a.settings.split(",") if s.strip()]
        bad = set(prof.settings) - set(SETTINGS)
        if bad:
            ap.error(f"unknown settings {sorted(bad)}")
    if a.repeats:
        prof.repeats = a.repeats
    if a.steps:
        prof.steps = {s: a.steps for s in prof.steps}
    if a.skip is not None:
        if a.skip < 1:
            ap.error("--skip must be >= 1 (the window starts at the end of step `skip`)")
        prof.skip = a.skip
        prof.skip_for = {}
    if a.workers is not None:
        prof.workers = a.workers
    if a.batch_size is not None:
        prof.batch_size = a.batch_size
    if a.precision is not None:
        prof.precision = a.precision
    for s in prof.settings:
        if prof.steps[s] < prof.skip_of(s) + 2:
            ap.error(f"{s}: {prof.steps[s]} steps leave fewer than 2 after skipping {prof.skip_of(s)}")
    global THREADS, DEVICE
    THREADS, DEVICE = a.threads, a.device
    base = Path(a.out) if a.out else BENCH / ("results-tiny" if a.tiny else "results")
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    ours_py, up_py = ours_python(), upstream_python(a.upstream_venv)
    up_model_dir = upstream_model_dir(work, prof.model)
    up_model_arg = f"local-dir:{up_model_dir}"
    print(f"probing interpreters (ours: {ours_py}, upstream: {up_py}) ...", flush=True)
    if DEVICE == "cuda" and not cuda_available(ours_py):
        print("bench_train: error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False); "
              "run on a GPU machine or with --device cpu", file=sys.stderr)
        return 2
    ours_info, up_info = probe(ours_py, prof.model), probe(up_py, up_model_arg)
    if not ours_info["trainer"].replace("\\", "/").startswith(str(REPO / "src") + "/"):
        sys.exit(f"ours: open_clip_train resolves to {ours_info['trainer']}, not {REPO / 'src'}")
    up_trainer = Path(up_info["trainer"]).resolve()
    # open_clip_torch's copy sits beside its open_clip package (a venv's site-packages or a --target dir)
    if up_trainer.is_relative_to(REPO / "src") or not (up_trainer.parent.parent / "open_clip" / "__init__.py").is_file():
        sys.exit(f"upstream: open_clip_train resolves to {up_info['trainer']}, not open_clip_torch's copy")
    for info in (ours_info, up_info):
        p = Path(info["trainer"]).parent
        info["trainer_rel"] = str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)

    notes = []
    for k in ("torch", "open_clip", "timm", "numpy", "torch_threads"):
        if ours_info[k] != up_info[k]:
            notes.append(f"version mismatch: {k} ours={ours_info[k]} upstream={up_info[k]}")
    same = (ours_info["params_full"] == up_info["params_full"]
            and ours_info["params_lock_image"] == up_info["params_lock_image"])
    model_check = {
        "ours": {"full": ours_info.pop("params_full"), "lock_image": ours_info.pop("params_lock_image")},
        "upstream": {"full": up_info.pop("params_full"), "lock_image": up_info.pop("params_lock_image")},
    }
    model_check["summary"] = (
        f"{'identical' if same else 'DIFFERENT'} parameter counts when built by each environment's open_clip "
        f"(full: {model_check['upstream']['full']['total']:,} trainable; lock-image (upstream's "
        f"lock_image_tower): visual={model_check['upstream']['lock_image']['visual']:,}, "
        f"text={model_check['upstream']['lock_image']['text']:,})"
    )
    if not same:
        notes.append("model parameter counts differ between the two environments: see model_check")

    n_images = prof.batch_size * max(prof.steps[s] for s in prof.settings)
    print(f"data: {n_images} images at {prof.image_size}px ...", flush=True)
    tsv_all = make_data(work, ours_py, n_images, prof.image_size)
    # One TSV per step count, so each run is exactly one epoch of `steps` full batches (upstream's CSV
    # loader ignores --train-num-samples; both drop the last partial batch).
    tsvs = {}
    rows_all = tsv_all.read_text().splitlines()
    for s in prof.settings:
        n = prof.batch_size * prof.epoch_steps.get(s, prof.steps[s])
        t = tsv_all.with_name(f"train-{n}.tsv")
        t.write_text("\n".join(rows_all[: n + 1]) + "\n")
        tsvs[s] = t

    impls = {"ours": (ours_py, prof.model), "upstream": (up_py, up_model_arg)}
    runs: list[RunResult] = []
    order = 0
    t_start = time.perf_counter()
    for setting in prof.settings:
        for rep in range(prof.repeats):
            seq = ("ours", "upstream") if rep % 2 == 0 else ("upstream", "ours")  # A B, B A, ...
            for impl in seq:
                py, model_arg = impls[impl]
                load, waited = wait_for_quiet(a.quiet_threshold, a.max_wait) if a.max_wait > 0 else (other_load(), 0.0)
                print(f"[{time.perf_counter() - t_start:6.0f}s] {setting} / {impl} #{rep} "
                      f"({prof.steps[setting]} steps; other load {load:.2f} cores"
                      f"{f', waited {waited:.0f}s' if waited > 1 else ''}) ...", flush=True)
                r = run_trainer(impl, py, model_arg, setting, tsvs[setting], prof,
                                work / "runs" / f"{setting}-{impl}-r{rep}", rep, order, prof.steps[setting])
                r.load_before_cores, r.waited_s = round(load, 2), round(waited, 1)
                order += 1
                runs.append(r)
                print(f"         {r.samples_per_s:.2f} samples/s (median step {r.samples_per_s_median_step:.2f}, "
                      f"{r.cpu_s_per_step:.2f} CPU-s/step, {r.sys_s_per_step:.2f} sys), peak RSS {r.peak_rss_mib:.0f} MiB "
                      f"(tree {r.peak_tree_rss_mib:.0f}), start-up {r.startup_s:.1f}s, wall {r.wall_s:.0f}s, "
                      f"other load {r.other_load_cores:.2f} cores", flush=True)
    total_s = time.perf_counter() - t_start

    noisy = [r for r in runs if (r.other_load_cores or 0) > 0.25]
    if noisy:
        notes.append(f"{len(noisy)} of {len(runs)} runs shared the CPU with other processes (up to "
                     f"{max(r.other_load_cores for r in noisy):.2f} cores busy elsewhere during the measured window): "
                     "wall-clock samples/s of those runs is pessimistic; samples/CPU-s is the steadier comparison")
    for r in runs:
        check = {"full": "full", "lock-image": "lock_image", "after-unlock": "lock_image"}.get(r.setting)
        if r.impl == "ours" and r.trainable_params and check:  # INIT counts (lock-both: text 0 in both)
            expect = model_check["upstream"][check]
            if r.trainable_params != expect:
                notes.append(f"{r.setting}: ours trains {r.trainable_params} params, upstream's lock/build gives "
                             f"{expect}")
                break

    rows = summarise(runs, prof)
    cmd = "python benchmarks/bench_train.py" + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    meta = {
        "command": cmd.strip(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "ours": ours_info,
        "upstream": up_info,
        "config": dict(asdict(prof), threads_env=THREADS, device=DEVICE, upstream_model=up_model_arg.replace(str(REPO) + "/", ""),
                       data=str(tsv_all.parent.relative_to(REPO)) if tsv_all.is_relative_to(REPO) else str(tsv_all),
                       caption_tokens=caption_tokens(tsv_all, prof.batch_size)),
        "model_check": model_check,
        "total_benchmark_s": round(total_s, 1),
        "notes": notes,
    }
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    write_markdown(base.with_suffix(".md"), meta, rows, runs, prof)
    print(f"\nwrote {base.with_suffix('.md')} and {base.with_suffix('.json')} ({total_s / 60:.1f} min of runs)")
    for r in rows:
        q = r["ratio_ours_over_upstream"]
        print(f"  {r['setting']:>10}: samples/s ours {r['ours']['samples_per_s']:.2f} upstream "
              f"{r['upstream']['samples_per_s']:.2f} (x{q['samples_per_s']:.3f}); peak RSS ours "
              f"{r['ours']['peak_rss_mib']:.0f} MiB upstream {r['upstream']['peak_rss_mib']:.0f} MiB "
              f"(x{q['peak_rss_mib']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
