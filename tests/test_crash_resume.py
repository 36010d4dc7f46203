"""Faults injected into single-process runs, each followed by `--resume latest`.

Schedule: 3 epochs of 4 steps (32 samples, batch 8) with augmentation and one DataLoader
worker, image tower locked and unlocked at epoch 1 (half lr, ramped over 3 steps). The
reference runs uninterrupted. Every faulted run is resumed and must end with bitwise the same
weights and optimizer state, and the same results rows (one per epoch), as the reference.

SIGKILL needs a real process (nothing may run after it): those legs run `python -m
open_clip_train.main` in a subprocess with OPEN_CLIP_TRAIN_FAULT. The others run `main([...])`
in this process, which installs the real signal handlers; the hook sends the signal with
os.kill. Every run uses one intra-op thread, so the subprocess and in-process runs reduce in
the same order.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open_clip_train import checkpoint as ckpt
from open_clip_train import faults
from open_clip_train import trainer as trainer_module
from open_clip_train.demo_data import generate
from open_clip_train.main import main
from open_clip_train.preempt import EXIT_STOPPED

from launch import assert_same_checkpoint, clean_env, load

pytestmark = pytest.mark.slow

MODEL = "tiny-convnext-cliptext"
STEPS_PER_EPOCH = 4
EPOCHS = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=32, num_val=8, image_size=32, seed=0)


def args(demo, logs, name, *extra):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "coco", "--train-data", demo.train_annotations,
        "--val-data", demo.val_annotations, "--epochs", EPOCHS, "--train-num-samples", 32, "--batch-size", 8,
        "--lr", "1e-3", "--warmup", 2, "--workers", 1, "--precision", "fp32", "--seed", 0,
        "--lock-image", "--unfreeze-image-at-epoch", 1, "--unfreeze-new-lr-scale", 0.5,
        "--unfreeze-warmup-steps", 3, "--log-every-n-steps", 1, "--log-dir", logs, "--name", name,
        "--resume", "latest", *extra)]


def in_process(argv, fault=None):
    """main() here, on one thread, with the fault hook set as the environment variable would."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.pop(faults.ENV, None)
    if fault:
        os.environ[faults.ENV] = fault
    try:
        return main(argv)
    finally:
        os.environ.pop(faults.ENV, None)
        if old is not None:
            os.environ[faults.ENV] = old
        torch.set_num_threads(threads)


def subprocess_run(argv, fault):
    env = clean_env(**{faults.ENV: fault})
    return subprocess.run([sys.executable, "-m", "open_clip_train.main", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def rows(run_dir: Path):
    path = run_dir / "checkpoints" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def files(run_dir: Path):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def reference(demo, logs):
    assert in_process(args(demo, logs, "reference")) == 0
    return logs / "reference"


def assert_same_end(reference: Path, run: Path):
    ref, got = load(reference / "checkpoints" / f"epoch_{EPOCHS}.pt"), load(run / "checkpoints" / f"epoch_{EPOCHS}.pt")
    assert got["step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_checkpoint(ref, got)
    assert [r["epoch"] for r in rows(run)] == list(range(1, EPOCHS + 1))  # one row per epoch
    assert rows(run) == rows(reference)


def test_reference_trained(reference, demo):
    """The comparisons below are not vacuous: the trunk (unlocked at epoch 1) and the head moved."""
    end = load(reference / "checkpoints" / f"epoch_{EPOCHS}.pt")["state_dict"]
    before = load(reference / "checkpoints" / "epoch_1.pt")["state_dict"]
    moved = [k for k in end if k.startswith("visual.trunk.") and not torch.equal(end[k], before[k])]
    assert len(moved) > 10
    assert files(reference) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "results.jsonl"]


# ---------------------------------------------------------------- SIGKILL mid-epoch, torn logs
@pytest.fixture(scope="module")
def killed(demo, logs, reference):
    run = logs / "killed"
    proc = subprocess_run(args(demo, logs, "killed", "--save-every-n-steps", 3), "kill_at_step:7")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    after_kill = files(run)
    latest = ckpt.find_latest(run / "checkpoints")
    latest_state = load(latest)
    # a kill in the middle of appending a results row / a log line leaves a torn last line
    with open(run / "checkpoints" / "results.jsonl", "a") as f:
        f.write('{"epoch": 2, "num_samples": 40, "coco_i2t_R')
    with open(run / "out.log", "a") as f:
        f.write("2000-01-01,00:00:00 | INFO | Train Epoch: 1 [24/3")
    assert in_process(args(demo, logs, "killed")) == 0
    return run, after_kill, latest, latest_state


def test_sigkill_mid_epoch_leaves_the_step_checkpoint_as_latest(killed):
    run, after_kill, latest, state = killed
    # step 3's checkpoint was superseded by epoch_1.pt; step 6 (epoch 1, 2 of 4 steps) is the newest
    assert after_kill == ["epoch_1.pt", "results.jsonl", "step_6.pt"]
    assert latest.name == "step_6.pt"
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 2, 6)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(killed, reference):
    run, *_ = killed
    assert_same_end(reference, run)
    log = (run / "out.log").read_text()
    assert "=> resumed checkpoint" in log and "step_6.pt' (epoch 1, step 6, 2/4 steps into epoch 1)" in log
    assert files(run) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "results.jsonl"]  # step_6.pt superseded


def test_torn_results_line_is_dropped_and_log_appended(killed):
    run, *_ = killed
    text = (run / "checkpoints" / "results.jsonl").read_text()
    assert "coco_i2t_R\n" not in text and text.endswith("\n")
    log = (run / "out.log").read_text()
    assert "results.jsonl: dropping half-written line 2" in log
    assert log.count("| INFO | world:") == 2  # the killed run's log is kept, the resumed one appended
    torn = log.index("Train Epoch: 1 [24/3")
    next_line = log[torn:].splitlines()[1]
    assert next_line.startswith(("20", "=>")) and "|" in next_line  # the torn line was ended


# ---------------------------------------------------------------- SIGKILL while writing a checkpoint
@pytest.fixture(scope="module")
def killed_in_save(demo, logs, reference):
    run = logs / "killed_in_save"
    # step 8 is epoch 2's end: the kill lands in the middle of writing epoch_2.pt, with
    # --delete-previous-checkpoint, which may only delete epoch_1.pt after that write
    proc = subprocess_run(args(demo, logs, "killed_in_save", "--save-every-n-steps", 3,
                               "--delete-previous-checkpoint"), "kill_in_save:8")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    after_kill = files(run)
    tmp = [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".epoch_2.pt.tmp-")]
    latest = ckpt.find_latest(run / "checkpoints")
    tmp_readable = ckpt.position(tmp[0]) is not None if tmp else None
    previous = ckpt.position(run / "checkpoints" / "epoch_1.pt")
    assert in_process(args(demo, logs, "killed_in_save", "--save-every-n-steps", 3,
                           "--delete-previous-checkpoint")) == 0
    return run, after_kill, tmp, tmp_readable, latest, previous


def test_kill_while_writing_a_checkpoint_keeps_the_previous_ones(killed_in_save):
    run, after_kill, tmp, tmp_readable, latest, previous = killed_in_save
    assert len(tmp) == 1 and tmp_readable is False  # half a file, never renamed into place
    assert [n for n in after_kill if not n.startswith(".")] == ["epoch_1.pt", "results.jsonl", "step_6.pt"]
    assert latest.name == "step_6.pt"
    assert previous == (1, 4)  # epoch_1.pt still loads: deleted only after epoch_2.pt is on disk


def test_kill_while_writing_then_resume_cleans_up_and_equals_the_uninterrupted_run(killed_in_save, reference):
    run, _, tmp, *_ = killed_in_save
    assert not tmp[0].exists()
    assert f"removed {tmp[0].name}" in (run / "out.log").read_text()
    assert_same_end(reference, run)
    assert files(run) == ["epoch_3.pt", "results.jsonl"]  # --delete-previous-checkpoint: only the newest


def test_delete_previous_checkpoint_never_leaves_zero(demo, logs, monkeypatch):
    """At every checkpoint write of a run with --delete-previous-checkpoint and step checkpoints,
    the directory already holds a complete checkpoint (after the first write)."""
    seen = []
    save = ckpt.atomic_save

    def checking_save(obj, path):
        seen.append([p.name for p in path.parent.iterdir() if ckpt.position(p) is not None])
        save(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", checking_save)
    argv = args(demo, logs, "delete_prev", "--save-every-n-steps", 2, "--delete-previous-checkpoint", "--epochs", 2)
    assert in_process(argv) == 0
    assert seen[0] == [] and all(len(s) >= 1 for s in seen[1:])
    assert len(seen) == 4  # step_2, epoch_1 (step 4 is the epoch end), step_6, epoch_2
    assert files(logs / "delete_prev") == ["epoch_2.pt", "results.jsonl"]


# ---------------------------------------------------------------- SIGTERM / SIGUSR1
@pytest.fixture(scope="module", params=[("sigterm", 6), ("sigusr1", 4)], ids=["SIGTERM-mid-epoch", "SIGUSR1-epoch-end"])
def signalled(request, demo, logs, reference):
    kind, step = request.param
    name = f"signal_{kind}"
    code = in_process(args(demo, logs, name), f"{kind}_at_step:{step}")
    after_stop = files(logs / name)
    path = logs / name / "checkpoints" / f"step_{step}.pt"
    state = load(path) if path.exists() else None
    stopped_rows = [r["epoch"] for r in rows(logs / name)]
    stopped_log = (logs / name / "out.log").read_text()
    resumed = in_process(args(demo, logs, name))
    return logs / name, kind, step, code, after_stop, state, stopped_rows, stopped_log, resumed


def test_stop_signal_checkpoints_that_step_and_exits_75(signalled):
    run, kind, step, code, after_stop, state, stopped_rows, log, _ = signalled
    assert code == EXIT_STOPPED == 75
    assert f"step_{step}.pt" in after_stop
    epoch, epoch_step = divmod(step - 1, STEPS_PER_EPOCH)
    assert (state["epoch"], state["epoch_step"]) == (epoch, epoch_step + 1)
    assert stopped_rows == list(range(1, epoch + 1))  # the stopped epoch was not evaluated yet
    assert f"{kind.upper()} received: stopping after step {step} " in log
    assert "stopped on" in log and "continue with --resume latest" in log
    assert log.count(f"saved step_{step}.pt") == 1
    assert f"Train Epoch: {epoch} " in log and f"step {step + 1} " not in log


def test_stop_signal_then_resume_equals_the_uninterrupted_run(signalled, reference):
    run, *_, resumed = signalled
    assert resumed == 0
    assert_same_end(reference, run)


def test_signal_during_evaluation_stops_after_the_epoch_checkpoint(demo, logs, monkeypatch):
    """A signal that lands while epoch 1 is evaluated: evaluation and the epoch checkpoint finish
    untouched, no extra checkpoint is written, and the run stops before epoch 2 trains."""
    evaluate = trainer_module.Trainer.evaluate

    def evaluate_then_signal(self, epoch, **kw):
        row = evaluate(self, epoch, **kw)
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", evaluate_then_signal)
    assert in_process(args(demo, logs, "signal_eval")) == EXIT_STOPPED
    run = logs / "signal_eval"
    assert files(run) == ["epoch_1.pt", "results.jsonl"]
    assert [r["epoch"] for r in rows(run)] == [1]
    assert "step 5 " not in (run / "out.log").read_text()
    assert ckpt.find_latest(run / "checkpoints").name == "epoch_1.pt"


def test_no_signal_handler_left_behind(reference):
    """main() restores the handlers it replaced (a test or notebook keeps its own)."""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
