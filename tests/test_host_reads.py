"""Host reads on the training hot path. On a GPU every read of a device value (`.item()`,
`float(t)`, `.tolist()`, ...) makes the host wait for the queued kernels. A step's only read is
the agreement on its decisions (`numerics.step_flags`), and with a fused optimizer (the default
AdamW) it is read during the NEXT step, after that step's forward and backward are queued (or at
a log step), so the host never waits for the step it just queued. The loss terms stay on the
device until a log step. CPU tensors cannot show the wait, but the reads themselves can be
counted: a TorchFunctionMode sees every tensor method our code calls.
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

    def __init__(self, ignore: tuple = (TORCH_DIR,), identify=lambda tensor: None):
        super().__init__()
        self.seen, self.ignore, self.identify, self.read_of = [], ignore, identify, []

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
                self.read_of.append(self.identify(args[0]))  # now, while the tensor's id is its own
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
    """Train 2 epochs of 3 steps, logging every 2 steps; returns, per train_step call, its reads
    (with "backward" where the step's backward ran) and which earlier step's agreement flags each
    read was of (None: of something else), then the reads of each IntervalMeter.add and out.log."""
    steps, adds, batch_tokens, trimmed_tokens = [], [], [], []
    train_step, add = trainer_module.Trainer.train_step, progress.IntervalMeter.add
    host_prefix_length = trainer_module.host_prefix_length
    backward, start = trainer_module.Trainer._backward, trainer_module.PendingAgreement.start
    flags_of_step, read_of = {}, []  # id of a step's flags on the host -> its train_step index
    current = []

    def seen_backward(self, loss):
        current[-1].seen.append(("backward", ""))
        return backward(self, loss)

    def seen_start(flags, *args):
        pending = start(flags, *args)
        flags_of_step[id(pending.host)] = len(steps)  # the step being counted (0-based)
        return pending

    def seen_batch(self, batches):
        batch_tokens.extend(id(b[1]) for b in batches)
        return train_step(self, batches)

    def seen_trim(models, tokens):
        n = host_prefix_length(models, tokens)
        trimmed_tokens.append((id(tokens), n))
        return n

    def counted(record, fn, track=False):
        def wrapper(*args, **kwargs):
            with HostReads(identify=lambda t: flags_of_step.get(id(t))) as mode:
                current.append(mode)
                out = fn(*args, **kwargs)
            if track:
                read_of.append(mode.read_of)
            record.append(mode.seen)
            return out
        return wrapper

    monkeypatch.setattr(trainer_module, "host_prefix_length", seen_trim)
    monkeypatch.setattr(trainer_module.Trainer, "_backward", seen_backward)
    monkeypatch.setattr(trainer_module.PendingAgreement, "start", staticmethod(seen_start))
    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted(steps, seen_batch, track=True))
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
    return steps, read_of, adds, log


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
def test_a_training_step_reads_only_the_previous_steps_agreement(demo, video, teacher, tmp_path, monkeypatch,
                                                                  kind, extra):
    steps, read_of, adds, log = run(data_args(kind, demo, video, teacher, tmp_path), tmp_path, monkeypatch, *extra)
    assert len(steps) == 6 and len(adds) == 6
    # Per epoch of 3 steps, logging after steps 2 and 3 (where the pending flags are read at once):
    # step 1 has nothing pending, step 2 reads step 1's flags, step 3 has nothing pending again.
    accum = 2 if "--accum-freq" in extra else 1
    for i, reads in enumerate(steps):
        if i % 3 == 1:
            names = [name for name, _ in reads]
            assert names == ["backward"] * accum + ["tolist"], reads  # after this step's work is queued
            assert reads[-1][1].startswith("numerics.py:"), reads
            assert read_of[i] == [i - 1]  # the flags of the step before
        else:
            assert [name for name, _ in reads] == ["backward"] * accum, reads
    assert adds == [[]] * 6  # the meter sums the terms on the device
    # ... and the logged losses are still the interval's means (2 log lines per epoch: 2, 3)
    lines = [x for x in log.splitlines() if "Train Epoch:" in x]
    assert len(lines) == 4 and all("Contrastive_loss: " in x for x in lines)
    if kind == "video-distill":
        assert all("Distill_coarse_loss: " in x for x in lines)


def test_an_optimizer_without_a_device_skip_reads_within_the_step(demo, video, teacher, tmp_path, monkeypatch):
    """Plain SGD cannot drop an update on the device: each step reads its own flags, once, after
    its backward (and so waits for it)."""
    steps, read_of, adds, _ = run(data_args("coco", demo, video), tmp_path, monkeypatch, "--batch-size", 16,
                                  "--opt", "sgd")
    assert len(steps) == 6 and adds == [[]] * 6
    for reads in steps:
        assert [name for name, _ in reads] == ["backward", "tolist"], reads
        assert reads[-1][1].startswith("trainer.py:"), reads
    assert read_of == [[None]] * 6  # its own flags, not a pending step's


def test_the_host_sync_benchmark_counts_the_deferred_and_the_immediate_reads(tmp_path):
    """benchmarks/bench_host_sync.py (run by scripts/gpu_check.sh on CUDA) on CPU: in its counted
    first interval (3 steps, logging after the third), the run as it is reads the previous step's
    flags in steps 2 and 3; reading within the step reads each step's own, 3 times."""
    import json
    import os
    import subprocess

    out = tmp_path / "hs"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host_sync.py"),
                           "--steps", "6", "--log-every", "3", "--workers", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    assert runs["as-is"]["steps"] == runs["immediate"]["steps"] == 6
    (site, n), = runs["as-is"]["reads"].items()
    assert site.startswith("open_clip_train/numerics.py:") and site.endswith("(read)") and n == 2
    (site, n), = runs["immediate"]["reads"].items()
    assert site.startswith("open_clip_train/trainer.py:") and site.endswith("(_update)") and n == 3
    assert runs["as-is"]["syncs"] is None
    assert "a step later" in out.with_suffix(".md").read_text()
