"""Host reads on the training hot path. On a GPU every read of a device value (`.item()`,
`float(t)`, `.tolist()`, ...) makes the host wait for the queued kernels, so a step should read
exactly once: the agreement on the step's decisions (`numerics.agree_on_step`). The loss terms
stay on the device until a log step. CPU tensors cannot show the wait, but the reads themselves
can be counted: a TorchFunctionMode sees every tensor method our code calls.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from open_clip_train import progress
from open_clip_train import trainer as trainer_module
from open_clip_train.demo_data import generate
from open_clip_train.main import main

# (not `numpy`: it refuses a device tensor, so a value it reads was on the host already)
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu"}
TORCH_DIR = str(Path(torch.__file__).parent)
MODEL = "tiny-convnext-cliptext"


class HostReads(TorchFunctionMode):
    """Records (function, file:line of the caller) for each read made outside torch itself
    (torch's own reads, e.g. the optimizer's step counter, are CPU scalars on any device) and
    outside `host_prefix_length`, which reads the batch's host copy (checked below)."""

    def __init__(self, ignore: tuple = (TORCH_DIR,)):
        super().__init__()
        self.seen, self.ignore = [], ignore

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            caller = sys._getframe(1)
            frames, f = set(), caller
            while f is not None:
                frames.add(f.f_code.co_name)
                f = f.f_back
            if not caller.f_code.co_filename.startswith(self.ignore) and "host_prefix_length" not in frames:
                self.seen.append((name, f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=48, num_val=8, image_size=32, seed=0)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """MSR-VTT-shaped demo data and a teacher cache of a tiny teacher (extract_teacher)."""
    from open_clip_train.extract_teacher import main as extract
    from open_clip_train.models import create_model
    from open_clip_train.video.demo import write_demo

    root = tmp_path_factory.mktemp("video")
    write_demo(root / "data", num_train=12, num_test=4, seed=0)
    torch.manual_seed(1)
    torch.save(create_model(MODEL)[0].state_dict(), root / "teacher.pt")
    assert extract(["--dataset-type", "msrvtt", "--train-data", str(root / "data"), "--max-frames", "2",
                    "--teacher-model", MODEL, "--teacher-pretrained", str(root / "teacher.pt"), "--out",
                    str(root / "cache"), "--dtype", "float32", "--workers", "0"]) == 0
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from open_clip_train.models import create_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(2)
    torch.save(create_model(MODEL)[0].state_dict(), path)
    return path


def data_args(kind, demo, video, teacher=None, tmp_path=None):
    coco = ["--dataset-type", "coco", "--train-data", demo.train_annotations, "--no-augment"]
    if kind == "coco":
        return coco
    if kind == "coco-distill":
        return coco + ["--distill", "--teacher-model", MODEL, "--teacher-pretrained", teacher]
    if kind == "coco-frozen-cache":
        return coco + ["--lock-image", "--lock-text", "--frozen-feature-cache", tmp_path / "frozen"]
    args = ["--dataset-type", "msrvtt", "--train-data", video / "data", "--video-pooling", "afa", "--max-frames", 2]
    if kind == "video-distill":
        args += ["--distill", "--teacher-model", MODEL, "--teacher-cache", video / "cache"]
    return args


def run(data, tmp_path, monkeypatch, *extra):
    """Train 2 epochs of 3 steps, logging every 2 steps; returns the reads of each train_step call
    and of each IntervalMeter.add call."""
    steps, adds, batch_tokens, trimmed_tokens = [], [], [], []
    train_step, add = trainer_module.Trainer.train_step, progress.IntervalMeter.add
    host_prefix_length = trainer_module.host_prefix_length

    def seen_batch(self, batches):
        batch_tokens.extend(id(b[1]) for b in batches)
        return train_step(self, batches)

    def seen_trim(models, tokens):
        n = host_prefix_length(models, tokens)
        trimmed_tokens.append((id(tokens), n))
        return n

    def counted(record, fn):
        def wrapper(*args, **kwargs):
            with HostReads() as mode:
                out = fn(*args, **kwargs)
            record.append(mode.seen)
            return out
        return wrapper

    monkeypatch.setattr(trainer_module, "host_prefix_length", seen_trim)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted(steps, seen_batch))
    monkeypatch.setattr(progress.IntervalMeter, "add", counted(adds, add))
    argv = [str(a) for a in (
        "--model", MODEL, *data, "--epochs", 2, "--train-num-samples", 48, "--lr", "1e-3", "--warmup", 1,
        "--workers", 0, "--precision", "fp32", "--device", "cpu", "--seed", 0, "--log-every-n-steps", 2,
        "--log-dir", tmp_path, "--name", "reads", *extra)]
    assert main(argv) == 0
    log = (tmp_path / "reads" / "out.log").read_text()
    if "--frozen-feature-cache" in data:  # the text tower's outputs come from the cache: nothing to trim
        assert trimmed_tokens and all(n is None for _, n in trimmed_tokens)
    else:  # the text trim's prefix came from the loader's own token tensors, before they moved
        assert [i for i, _ in trimmed_tokens] == batch_tokens and len(batch_tokens) >= 6
        assert all(n is not None for _, n in trimmed_tokens)  # every batch went the host's way
    return steps, adds, log


@pytest.mark.parametrize("kind, extra", [
    ("coco", ("--batch-size", 16)),
    ("coco", ("--batch-size", 8, "--grad-clip-norm", "1.0", "--accum-freq", 2)),
    ("coco", ("--batch-size", 16, "--siglip")),
    ("coco-distill", ("--batch-size", 16)),
    ("coco-frozen-cache", ("--batch-size", 16)),
    ("video", ("--batch-size", 16)),
    ("video-distill", ("--batch-size", 8, "--accum-freq", 2)),
], ids=["coco", "coco-clip-accum", "coco-siglip", "coco-live-teacher", "coco-frozen-cache", "video",
        "video-distill-cache-accum"])
def test_a_training_step_reads_the_device_once(demo, video, teacher, tmp_path, monkeypatch, kind, extra):
    steps, adds, log = run(data_args(kind, demo, video, teacher, tmp_path), tmp_path, monkeypatch, *extra)
    assert len(steps) == 6 and len(adds) == 6
    for reads in steps:
        assert [name for name, _ in reads] == ["tolist"], reads
        assert reads[0][1].startswith("numerics.py:"), reads
    assert adds == [[]] * 6  # the meter sums the terms on the device
    # ... and the logged losses are still the interval's means (3 log lines per run: 2, 3 | 2, 3)
    lines = [x for x in log.splitlines() if "Train Epoch:" in x]
    assert len(lines) == 4 and all("Contrastive_loss: " in x for x in lines)
    if kind == "video-distill":
        assert all("Distill_coarse_loss: " in x for x in lines)


def test_the_host_sync_benchmark_counts_the_one_read_and_its_ablation_removes_it(tmp_path):
    """benchmarks/bench_host_sync.py (run by scripts/gpu_check.sh on CUDA) on CPU: its counters see
    the agreement's read in every counted step of the run as it is, and none once ablated."""
    import json
    import os
    import subprocess

    out = tmp_path / "hs"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host_sync.py"),
                           "--steps", "6", "--log-every", "3", "--workers", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    assert runs["as-is"]["steps"] == runs["ablated"]["steps"] == 6
    (site, n), = runs["as-is"]["reads"].items()
    assert site.startswith("open_clip_train/numerics.py:") and site.endswith("(agree_on_step)") and n == 3
    assert runs["ablated"]["reads"] == {} and runs["as-is"]["syncs"] is None
    assert "agree_on_step" in out.with_suffix(".md").read_text()
