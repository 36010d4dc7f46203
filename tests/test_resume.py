"""Resuming across an unlock.

Schedule under test: 3 epochs of 2 steps, image tower locked, unlocked at epoch 1 at half the lr
and ramped over 3 steps. Runs (each through `main([...])`):

* full:  3 epochs uninterrupted;
* crash: `--resume latest` on a new name (nothing to resume: starts fresh), killed right after
         epoch 2's checkpoint, then `--resume latest` again: continues from epoch_2.pt (AFTER the
         unlock);
* from1: a copy of the crashed run resumed from epoch_1.pt (BEFORE the unlock).

Data order depends only on (seed, epoch) and nothing else draws random numbers, so the resumed
runs must end with bitwise the same weights, optimizer state and results as the full run.
"""
import json
import shutil

import pytest
import torch

from open_clip_train import trainer as trainer_module
from open_clip_train.cli_config import config_from_args
from open_clip_train.demo_data import generate
from open_clip_train.distributed import World
from open_clip_train.main import main
from open_clip_train.params import parse_args
from open_clip_train.schedule import lr_at, ramp

from launch import assert_same_checkpoint, load

pytestmark = pytest.mark.slow

MODEL = "tiny-convnext-cliptext"
STEPS_PER_EPOCH = 2
UNLOCK = "unlock_image@1"


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=32, num_val=8, image_size=32, seed=0)


def args(demo, logs, name, *extra):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "coco", "--train-data", demo.train_annotations,
        "--val-data", demo.val_annotations, "--epochs", 3, "--train-num-samples", 32, "--batch-size", 16,
        "--lr", "1e-3", "--warmup", 2, "--workers", 0, "--precision", "fp32", "--no-augment", "--seed", 0,
        "--lock-image", "--unfreeze-image-at-epoch", 1, "--unfreeze-new-lr-scale", 0.5,
        "--unfreeze-warmup-steps", 3, "--log-dir", logs, "--name", name, *extra)]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    assert main(args(demo, logs, "full")) == 0

    save = trainer_module.Trainer.save

    def save_then_crash(self, completed_epoch):
        save(self, completed_epoch)
        if completed_epoch == 2:
            raise Crash()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Trainer, "save", save_then_crash)
        with pytest.raises(Crash):
            main(args(demo, logs, "crash", "--resume", "latest"))
    shutil.copytree(logs / "crash", logs / "from1")
    (logs / "from1" / "checkpoints" / "epoch_2.pt").unlink()
    crashed_rows = rows(logs / "crash")

    assert main(args(demo, logs, "crash", "--resume", "latest")) == 0
    assert main(args(demo, logs, "from1", "--resume", logs / "from1" / "checkpoints" / "epoch_1.pt")) == 0
    return logs, crashed_rows


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]


def test_resume_latest_with_nothing_to_resume_starts_fresh_with_a_note(runs):
    logs, crashed_rows = runs
    log = (logs / "crash" / "out.log").read_text()
    assert "--resume latest: no checkpoint to resume in" in log and "starting fresh" in log
    assert [r["epoch"] for r in crashed_rows] == [1, 2]  # trained from epoch 0 until the crash


@pytest.mark.parametrize("name", ["crash", "from1"])
def test_resumed_run_ends_bitwise_equal_to_the_uninterrupted_one(runs, name):
    logs, _ = runs
    full, resumed = load(logs / "full" / "checkpoints" / "epoch_3.pt"), load(logs / name / "checkpoints" / "epoch_3.pt")
    assert resumed["step"] == 3 * STEPS_PER_EPOCH
    assert_same_checkpoint(full, resumed)


@pytest.mark.parametrize("name", ["crash", "from1"])
def test_results_have_one_row_per_epoch_after_resume(runs, name):
    logs, _ = runs
    resumed, full = rows(logs / name), rows(logs / "full")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    assert resumed == full  # same weights, same metrics


def test_checkpoint_before_the_unlock_unlocks_on_schedule(runs):
    logs, _ = runs
    log = (logs / "from1" / "out.log").read_text()
    resumed_part = log[log.index("=> resumed checkpoint"):]
    assert "trainable params (RESUME at epoch 1)" in resumed_part
    assert "unlock at epoch 1: image" in resumed_part
    assert resumed_part.count("unlock at epoch") == 1
    assert [g["name"].split("/")[0] for g in load(logs / "from1" / "checkpoints" / "epoch_3.pt")["param_groups"]] == [
        "base", "base", UNLOCK, UNLOCK]


# ------------------------------------------------------------------ the resumed state itself


def build(demo, logs, name, *extra):
    cfg = config_from_args(parse_args(args(demo, logs, name, *extra)))
    return trainer_module.Trainer.build(cfg, World(), torch.device("cpu"), None)


def expected_lr(trainer, group, step):
    return lr_at(step, trainer.schedule) * group["lr_scale"] * ramp(step, group["ramp_start"], group["ramp_steps"])


def test_checkpoint_after_the_unlock_restores_trainable_set_groups_state_and_lr(runs, demo):
    logs, _ = runs
    path = logs / "full" / "checkpoints" / "epoch_2.pt"
    saved = load(path)
    trainer = build(demo, logs, "inspect")
    trainer.resume(path)
    model, opt = trainer.model, trainer.optimizer

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for g in saved["param_groups"] for n in g["param_names"]}
    assert trainable == set(trainer.plan.rules_at(1))
    assert any(n.startswith("visual.trunk.") for n in trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in opt.param_groups] == [
        g["param_names"] for g in saved["param_groups"]]
    assert [g["name"] for g in opt.param_groups] == ["base", "base/no_wd", f"{UNLOCK}/x0.5", f"{UNLOCK}/x0.5/no_wd"]
    assert [(g["ramp_start"], g["ramp_steps"]) for g in opt.param_groups] == [(0, 0), (0, 0), (2, 3), (2, 3)]

    state = opt.state_dict()["state"]
    assert state.keys() == saved["optimizer"]["state"].keys()
    for i in state:
        for key, value in state[i].items():
            assert torch.equal(value, saved["optimizer"]["state"][i][key])

    assert trainer.step == 2 * STEPS_PER_EPOCH and trainer.start_epoch == 2
    for g in opt.param_groups:  # set for the next step, ramp included
        assert g["lr"] == pytest.approx(expected_lr(trainer, g, trainer.step), rel=1e-12)
    assert opt.param_groups[2]["lr"] == pytest.approx(lr_at(4, trainer.schedule) * 0.5 * 1.0)
    trainer.enter_epoch(2)  # nothing left to unlock: no group added, no group repeated
    assert len(opt.param_groups) == 4


def test_checkpoint_before_the_unlock_resumes_locked_then_unlocks(runs, demo):
    logs, _ = runs
    trainer = build(demo, logs, "inspect")
    trainer.resume(logs / "full" / "checkpoints" / "epoch_1.pt")
    locked = {n for n, p in trainer.model.named_parameters() if n.startswith("visual.trunk.") and not p.requires_grad}
    assert locked == {n for n, _ in trainer.model.named_parameters() if n.startswith("visual.trunk.")}
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["base", "base/no_wd"]

    trainer.enter_epoch(1)
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if n.startswith("visual.trunk."))
    groups = trainer.optimizer.param_groups
    assert [g["name"] for g in groups] == ["base", "base/no_wd", f"{UNLOCK}/x0.5", f"{UNLOCK}/x0.5/no_wd"]
    assert {(g["ramp_start"], g["ramp_steps"]) for g in groups[2:]} == {(STEPS_PER_EPOCH, 3)}


def test_resume_with_other_freezing_flags_is_a_user_error(runs, demo, capfd):
    logs, _ = runs
    argv = args(demo, logs, "mismatch", "--resume", logs / "full" / "checkpoints" / "epoch_2.pt")
    i = argv.index("--unfreeze-image-at-epoch")
    argv[i + 1] = "2"  # at epoch 2 the trunk would still have been locked when epoch_2.pt was saved
    capfd.readouterr()
    assert main(argv) == 2
    err_lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "trains a different parameter set" in err_lines[0]


def test_evaluating_a_checkpoint_needs_no_training_flags(runs, demo):
    """`--resume CKPT --val-data ...` without training data evaluates the checkpoint's weights,
    whatever freezing flags it was trained with."""
    logs, _ = runs
    argv = [str(a) for a in ("--model", MODEL, "--dataset-type", "coco", "--val-data", demo.val_annotations,
                             "--batch-size", 16, "--workers", 0, "--precision", "fp32", "--log-dir", logs,
                             "--name", "eval_only", "--resume", logs / "full" / "checkpoints" / "epoch_3.pt")]
    assert main(argv) == 0
    (row,) = rows(logs / "eval_only")
    assert row == rows(logs / "full")[-1]  # epoch 3, same metrics as the run's own evaluation
