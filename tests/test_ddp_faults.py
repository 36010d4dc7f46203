"""Faults in a 2-rank torchrun group (CPU, gloo): SIGTERM through torchrun, and a worker crash
under `--max-restarts 1`. Each is resumed and must end bitwise equal to the uninterrupted
2-rank run (same layout, same reduction order).

Schedule: 2 epochs of 4 steps (32 samples, 2 ranks x batch 4), image tower locked and unlocked
at epoch 1. The launcher script wraps main: every rank dumps its final weights and writes its
exit code to $DUMP_DIR (the trainer itself checkpoints rank 0 only).
"""
import re
from pathlib import Path

import pytest
import torch

from open_clip_train.demo_data import generate
from open_clip_train.preempt import EXIT_STOPPED

import launch
from launch import DUMP_SCRIPT, assert_same_checkpoint, assert_same_weights, load

pytestmark = pytest.mark.slow

MODEL = "tiny-convnext-cliptext"

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_faults")
    demo = generate(root / "demo", num_train=32, num_val=8, image_size=32, seed=0)
    script = root / "launch.py"
    script.write_text(DUMP_SCRIPT)
    return root, demo, script


def train_args(demo, logs: Path, name: str, *extra):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "coco", "--train-data", demo.train_annotations,
        "--val-data", demo.val_annotations, "--epochs", 2, "--train-num-samples", 32, "--batch-size", 4,
        "--lr", "1e-3", "--warmup", 2, "--workers", 0, "--precision", "fp32", "--no-augment", "--seed", 0,
        "--lock-image", "--unfreeze-image-at-epoch", 1, "--device", "cpu", "--log-every-n-steps", 1,
        "--log-dir", logs, "--name", name, "--resume", "latest", *extra)]


def torchrun(script: Path, args, dump: Path, fault: str = "", max_restarts: int = 0):
    """Two ranks; the caller checks the outcome (some of these runs are meant to stop)."""
    return launch.torchrun(2, script, args, dump, fault=fault, max_restarts=max_restarts, timeout=300, check=False)


def assert_same_end(reference: Path, run: Path):
    ref, got = load(reference / "checkpoints" / "epoch_2.pt"), load(run / "checkpoints" / "epoch_2.pt")
    assert got["step"] == ref["step"] == 8
    assert_same_checkpoint(ref, got)


@pytest.fixture(scope="module")
def reference(setup):
    root, demo, script = setup
    proc = torchrun(script, train_args(demo, root / "logs", "reference"), root / "dump_reference")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "logs" / "reference"


# ---------------------------------------------------------------- SIGTERM through torchrun
@pytest.fixture(scope="module")
def sigterm(setup, reference):
    root, demo, script = setup
    run, dump = root / "logs" / "sigterm", root / "dump_sigterm"
    # rank 1 sends SIGTERM to torchrun after step 3; torchrun forwards it to both workers
    stopped = torchrun(script, train_args(demo, root / "logs", "sigterm"), dump, "sigterm_parent_at_step:3:rank=1")
    codes = {r: int((dump / f"rank{r}.rc").read_text()) for r in (0, 1) if (dump / f"rank{r}.rc").exists()}
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    log = (run / "out.log").read_text()
    resumed = torchrun(script, train_args(demo, root / "logs", "sigterm"), dump)
    return run, dump, stopped, codes, names, log, resumed


def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step_with_one_checkpoint(sigterm):
    run, dump, stopped, codes, names, log, _ = sigterm
    assert codes == {0: EXIT_STOPPED, 1: EXIT_STOPPED}, stopped.stderr[-4000:]
    step0 = re.findall(r"\| WARNING \| SIGTERM received: stopping after step (\d+) ", log)
    step1 = re.findall(r"rank 1 \| WARNING \| SIGTERM received: stopping after step (\d+) ", stopped.stderr)
    assert len(step0) == len(step1) == 1 and step0 == step1
    stop = int(step0[0])
    assert stop >= 3
    assert [n for n in names if n.startswith("step_")] == [f"step_{stop}.pt"]  # one checkpoint, rank 0's
    assert log.count(f"saved step_{stop}.pt") == 1
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    # both ranks stopped there: neither trained a step beyond it
    assert f"step {stop + 1} " not in log and f"step {stop + 1} " not in stopped.stderr
    # a clean stop: no traceback from the trainer on either rank
    assert "open_clip_train/trainer.py" not in stopped.stderr and "open_clip_train/main.py" not in stopped.stderr


def test_sigterm_then_resume_equals_the_uninterrupted_group(sigterm, reference):
    run, dump, _, _, _, _, resumed = sigterm
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_end(reference, run)
    assert_same_weights(load(dump / "rank0.pt"), load(dump / "rank1.pt"))


# ---------------------------------------------------------------- worker crash, torchrun restarts
@pytest.fixture(scope="module")
def restarted(setup, reference):
    root, demo, script = setup
    proc = torchrun(script, train_args(demo, root / "logs", "restart", "--save-every-n-steps", 2),
                    root / "dump_restart", "crash_at_step:7:rank=1", max_restarts=1)
    return root / "logs" / "restart", root / "dump_restart", proc


def test_crashed_worker_is_restarted_and_the_group_resumes_from_the_step_checkpoint(restarted, reference):
    run, dump, proc = restarted
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "injected crash at step 7" in proc.stderr  # the first attempt did crash
    log = (run / "out.log").read_text()
    assert log.count("| INFO | world:") == 2  # two attempts, one log
    assert "step_6.pt' (epoch 1, step 6, 2/4 steps into epoch 1)" in log
    assert_same_end(reference, run)
    assert_same_weights(load(dump / "rank0.pt"), load(dump / "rank1.pt"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_1.pt", "epoch_2.pt", "results.jsonl"]
    rows = (run / "checkpoints" / "results.jsonl").read_text().splitlines()
    assert [int(re.match(r'\{"epoch": (\d+)', r).group(1)) for r in rows] == [1, 2]


# ---------------------------------------------------------------- a NaN loss on one rank
def test_a_nan_loss_on_one_rank_is_skipped_on_both_by_their_agreement(setup, reference):
    """Rank 1 alone sees a NaN loss in step 2 (its gradients stay finite, so each rank's own check
    would disagree). Logging every 4 steps, the fused AdamW drops the update on the device and the
    flags are read a step later: both ranks skipped it (same weights), the optimizer counts one
    step fewer than the reference, and the log says so once."""
    root, demo, script = setup
    run, dump = root / "logs" / "nan_rank1", root / "dump_nan_rank1"
    proc = torchrun(script, train_args(demo, root / "logs", "nan_rank1", "--log-every-n-steps", 4,
                                       "--skip-nonfinite-steps", 1), dump, "nan_loss_at_step:2:rank=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_weights(load(dump / "rank0.pt"), load(dump / "rank1.pt"))
    log = (run / "out.log").read_text()
    assert log.count("non-finite loss at step 1 (epoch 0, step 2 of 4): contrastive_loss=") == 1
    assert "step skipped (no update), 1 of at most 1" in log
    ref, got = load(reference / "checkpoints" / "epoch_2.pt"), load(run / "checkpoints" / "epoch_2.pt")
    ref_steps = sorted(int(s["step"]) for s in ref["optimizer"]["state"].values())
    got_steps = sorted(int(s["step"]) for s in got["optimizer"]["state"].values())
    assert max(ref_steps) == 8 and [s + 1 if s > 4 else s for s in got_steps] == ref_steps  # text: 7 of 8
    assert not all(torch.equal(got["state_dict"][k], v) for k, v in ref["state_dict"].items())
