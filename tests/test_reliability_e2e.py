"""Faults injected into whole runs of `main([...])`: broken training/validation files,
non-finite losses and gradients (with and without a grad scaler), and what each run leaves.

Runs are tiny (tiny-convnext-cliptext, 2 steps per epoch); NaNs are injected by wrapping
`Trainer.train_step`, the same way the other e2e tests wrap trainer methods.
"""
import argparse
import json
import math

import pytest
import torch

from open_clip_train import preflight
from open_clip_train import trainer as trainer_module
from open_clip_train.cli_config import config_from_args
from open_clip_train.data import BadTally, DataCfg, get_data
from open_clip_train.demo_data import generate
from open_clip_train.errors import UserError
from open_clip_train.main import main
from open_clip_train.numerics import EXIT_CODE, is_failure
from open_clip_train.params import parse_args
from test_bad_data import PRE, break_coco
from test_data import byte_tokenizer

MODEL = "tiny-convnext-cliptext"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=32, num_val=8, image_size=32, seed=0)


@pytest.fixture(scope="module")
def broken_ann(demo, tmp_path_factory):
    return break_coco(demo, tmp_path_factory.mktemp("broken"))[0]


def args(train, val, logs, name, *extra):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "coco", "--train-data", train, "--val-data", val,
        "--epochs", 2, "--train-num-samples", 32, "--batch-size", 16, "--lr", "1e-3", "--warmup", 1,
        "--workers", 0, "--precision", "fp32", "--no-augment", "--seed", 0, "--log-dir", logs, "--name", name,
        *extra)]


def last_error(capfd) -> str:
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-3:]
    return lines[-1]


# ---- bad data ------------------------------------------------------------------------------------

def test_bad_samples_are_counted_per_epoch_in_out_log(broken_ann, tmp_path):
    """21 of 160 training pairs and 4 of 32 validation images are broken; the run finishes with
    each epoch's count (by reason, with examples) in out.log and bad images out of the metrics."""
    argv = args(broken_ann, broken_ann, tmp_path, "bad", "--max-bad-samples-fraction", 0.5)
    assert main(argv) == 0
    log = (tmp_path / "bad" / "out.log").read_text()
    info = get_data(DataCfg(train_data=str(broken_ann), train_num_samples=32, batch_size=16), PRE, PRE,
                    byte_tokenizer)["train"]
    for epoch in (0, 1):  # the same epochs, counted straight from the data
        info.set_epoch(epoch)
        expected = BadTally()
        for batch in info.dataloader:
            expected.add(batch.bad)
        assert expected.total > 0
        line = f"data, epoch {epoch}: {expected.describe(of=32)} (each replaced by a substitute sample)"
        assert line in log
    rows = [json.loads(r) for r in (tmp_path / "bad" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [(r["num_images"], r["num_bad_images"]) for r in rows] == [(28, 4)] * 2
    assert rows[-1]["num_samples"] == 28 * 5 - 1  # the broken images' captions and the empty one left out
    assert ("Eval Epoch: 1 left out 5 bad samples of 33 (15.2%): empty caption=1, empty file=1, missing file=1, "
            "truncated image=1, undecodable image=1; e.g. ") in log


def test_too_many_bad_samples_stop_the_run_at_once(broken_ann, tmp_path, capfd):
    assert main(args(broken_ann, broken_ann, tmp_path, "stop")) == 2
    line = last_error(capfd)
    assert line.startswith("error: bad training data: ") and "so far in epoch 0" in line
    assert "more than --max-bad-samples-fraction 0.01 of its 32 samples" in line
    assert "missing file=" in line or "empty file=" in line or "truncated image=" in line
    assert "; e.g. " in line and ".jpg" in line
    root = tmp_path / "stop"
    log = (root / "out.log").read_text()
    assert line[len("error: "):] in log  # the reason stays in the run's log
    assert "Train Epoch" not in log and not list((root / "checkpoints").glob("*.pt"))  # stopped at step 1
    assert (root / "params.txt").is_file()  # nothing already written is lost


# ---- non-finite steps -------------------------------------------------------------------------------

def inject(monkeypatch, at_step, how):
    """Corrupt the optimizer step `at_step` (global, 0-based): 'loss' feeds a NaN image,
    'grad' turns one parameter's gradient NaN (or inf) in the backward pass."""
    original = trainer_module.Trainer.train_step

    def train_step(self, batches):
        if self.step != at_step:
            return original(self, batches)
        if how == "loss":
            batches[0][0][0].fill_(float("nan"))
            return original(self, batches)
        value = float("nan") if how == "grad" else float("inf")
        hook = self.model.token_embedding.weight.register_hook(lambda g: torch.full_like(g, value))
        try:
            return original(self, batches)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step)


def test_nan_loss_stops_naming_step_terms_and_last_checkpoint(demo, tmp_path, monkeypatch, capfd):
    inject(monkeypatch, at_step=2, how="loss")  # first step of epoch 1, after epoch_1.pt
    assert main(args(demo.train_annotations, demo.val_annotations, tmp_path, "nan")) == EXIT_CODE == 3
    line = last_error(capfd)
    ckpt = tmp_path / "nan" / "checkpoints" / "epoch_1.pt"
    assert line == (f"error: non-finite loss at step 2 (epoch 1, step 1 of 2): contrastive_loss=nan; stopping: "
                    f"skipping is off (--skip-nonfinite-steps K allows K); last good checkpoint: {ckpt}")
    assert line[len("error: "):] in (tmp_path / "nan" / "out.log").read_text()
    state = torch.load(ckpt, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_gradient_with_clipping_stops_with_the_finite_loss(demo, tmp_path, monkeypatch, capfd):
    inject(monkeypatch, at_step=0, how="grad")
    argv = args(demo.train_annotations, demo.val_annotations, tmp_path, "grad", "--grad-clip-norm", 1.0)
    assert main(argv) == 3
    line = last_error(capfd)
    assert line.startswith("error: non-finite gradient at step 0 (epoch 0, step 1 of 2): contrastive_loss=")
    loss = float(line.split("contrastive_loss=")[1].split(";")[0])
    assert math.isfinite(loss)
    assert line.endswith("last good checkpoint: none")


def test_skip_nonfinite_steps_skips_and_counts(demo, tmp_path, monkeypatch):
    inject(monkeypatch, at_step=1, how="loss")
    argv = args(demo.train_annotations, demo.val_annotations, tmp_path, "skip", "--skip-nonfinite-steps", 1,
                "--log-every-n-steps", 1)
    assert main(argv) == 0
    log = (tmp_path / "skip" / "out.log").read_text()
    assert ("non-finite loss at step 1 (epoch 0, step 2 of 2): contrastive_loss=nan; step skipped (no update), "
            "1 of at most 1 (--skip-nonfinite-steps)") in log
    train_lines = [line for line in log.splitlines() if "Train Epoch" in line]
    assert len(train_lines) == 4 and "Skipped non-finite" not in train_lines[0]
    assert all(line.endswith("Skipped non-finite: 1") for line in train_lines[1:])
    assert "nan" not in " ".join(train_lines).lower()  # the skipped step's loss is kept out of the means
    state = torch.load(tmp_path / "skip" / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # 4 steps, 1 without update


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("how, extra", [("loss", ()), ("grad", ("--grad-clip-norm", 1.0))], ids=["loss", "grad-clip"])
def test_a_deferred_skip_drops_the_update_as_the_host_would(demo, tmp_path, monkeypatch, how, extra):
    """The default fused AdamW drops a failed step's update on the device and reads the flags a
    step later. Against the same run deciding on the host within the step (defer_agreement off):
    the same weights, optimizer state and logged means, bit for bit, and the same message."""
    inject(monkeypatch, at_step=1, how=how)  # mid-interval: logging every 4 of 8 steps
    started = []
    start = trainer_module.PendingAgreement.start
    monkeypatch.setattr(trainer_module.PendingAgreement, "start",
                        staticmethod(lambda *a: started.append(a[1]) or start(*a)))
    runs = {}
    for defer in (True, False):
        monkeypatch.setattr(trainer_module.Trainer, "defer_agreement", defer)
        name = f"{how}_{'deferred' if defer else 'host'}"
        argv = args(demo.train_annotations, demo.val_annotations, tmp_path, name, "--batch-size", 4, "--epochs", 1,
                    "--log-every-n-steps", 4, "--skip-nonfinite-steps", 1, *extra)
        assert main(argv) == 0
        runs[defer] = tmp_path / name
        if defer:
            assert started == list(range(8)), started  # every step's flags went the deferred way
    assert started == list(range(8))  # ... and none with defer_agreement off
    message = (f"non-finite {'loss' if how == 'loss' else 'gradient'} at step 1 (epoch 0, step 2 of 8): "
               "contrastive_loss=")
    for run in runs.values():
        log = (run / "out.log").read_text()
        assert message in log and "step skipped (no update), 1 of at most 1" in log
    deferred, host = (torch.load(runs[d] / "checkpoints" / "epoch_1.pt", weights_only=True) for d in (True, False))
    for key, value in host["state_dict"].items():
        assert torch.equal(deferred["state_dict"][key], value), key
    for i, state in host["optimizer"]["state"].items():
        assert int(state["step"]) == 7  # 8 steps, one without an update
        assert all(torch.equal(deferred["optimizer"]["state"][i][k], v) for k, v in state.items())
    losses = [[(r["losses"], r.get("skipped_nonfinite")) for r in _rows(runs[d])] for d in (True, False)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert all(math.isfinite(v) for r in losses[0] for v in r[0].values())


@pytest.mark.parametrize("defer, stop", [(True, 3), (False, 2)], ids=["deferred", "host"])
def test_a_stop_signal_is_acted_on_when_its_flags_are_read(demo, tmp_path, monkeypatch, defer, stop):
    """SIGTERM during step 2 (mid-interval): read a step later with the deferred agreement, so the
    run stops after step 3; within the step otherwise, after step 2. Either way one checkpoint of
    the step it stopped at."""
    from open_clip_train import faults
    from open_clip_train.preempt import EXIT_STOPPED

    monkeypatch.setattr(trainer_module.Trainer, "defer_agreement", defer)
    monkeypatch.setenv(faults.ENV, "sigterm_at_step:2")
    argv = args(demo.train_annotations, demo.val_annotations, tmp_path, "stop", "--batch-size", 4,
                "--log-every-n-steps", 4)
    assert main(argv) == EXIT_STOPPED
    log = (tmp_path / "stop" / "out.log").read_text()
    assert f"SIGTERM received: stopping after step {stop} (epoch 0, {stop}/8 steps)" in log
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == [f"step_{stop}.pt"]
    state = torch.load(tmp_path / "stop" / "checkpoints" / f"step_{stop}.pt", weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {stop}


@pytest.mark.parametrize("how", ["loss", "loss-only"])
def test_a_real_grad_scaler_skips_a_failed_step_alike_deferred_or_not(demo, tmp_path, monkeypatch, how):
    """torch's GradScaler (it runs on CPU too) with the fused AdamW: a failed step is dropped by
    the scaler's own inf check on the deferred path (a poisoned gradient) and by the host
    otherwise, with the same weights, moments and scale (halved once) either way; also when only
    a logged term is non-finite and the gradients are finite ('loss-only')."""
    if how == "loss":
        inject(monkeypatch, at_step=1, how="loss")
    else:
        forward_backward = trainer_module.Trainer._forward_backward

        def with_a_nan_term(self, *a):
            terms = forward_backward(self, *a)
            return dict(terms, probe=torch.tensor(float("nan"))) if self.step == 1 else terms

        monkeypatch.setattr(trainer_module.Trainer, "_forward_backward", with_a_nan_term)
    monkeypatch.setattr(trainer_module, "grad_scaler", lambda *a: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    states = {}
    for defer in (True, False):
        monkeypatch.setattr(trainer_module.Trainer, "defer_agreement", defer)
        name = f"scaler_{how}_{defer}"
        argv = args(demo.train_annotations, demo.val_annotations, tmp_path, name, "--batch-size", 4, "--epochs", 1,
                    "--log-every-n-steps", 4, "--skip-nonfinite-steps", 1)
        assert main(argv) == 0
        assert "step skipped (no update), 1 of at most 1" in (tmp_path / name / "out.log").read_text()
        states[defer] = torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", weights_only=True)
    deferred, host = states[True], states[False]
    assert all(torch.equal(deferred["state_dict"][k], v) for k, v in host["state_dict"].items())
    for i, state in host["optimizer"]["state"].items():
        assert int(state["step"]) == 7
        assert all(torch.equal(deferred["optimizer"]["state"][i][k], v) for k, v in state.items())
    assert deferred["scaler"]["scale"] == host["scaler"]["scale"] == 2.0 ** 9


class FakeScaler:
    """GradScaler's contract on CPU (the real one needs fp16 amp on CUDA): skips the update on
    inf/NaN gradients, and counts what it skipped."""

    def __init__(self):
        self.skipped, self.updates, self.found_inf = 0, 0, None

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.found_inf = not all(torch.isfinite(g).all() for g in grads)

    def step(self, optimizer):
        if self.found_inf is None:
            self.unscale_(optimizer)
        if self.found_inf:
            self.skipped += 1
        else:
            optimizer.step()

    def update(self):
        assert self.found_inf is not None, "update() without an inf check, as GradScaler asserts"
        self.updates, self.found_inf = self.updates + 1, None

    def state_dict(self):
        return {"skipped": self.skipped}


@pytest.mark.parametrize("how, code", [("inf", 0), ("loss", 3)])
def test_with_a_scaler_only_a_nonfinite_loss_counts(demo, tmp_path, monkeypatch, capfd, how, code):
    scalers = []
    monkeypatch.setattr(trainer_module, "grad_scaler", lambda *a: scalers.append(FakeScaler()) or scalers[-1])
    inject(monkeypatch, at_step=1, how=how)
    argv = args(demo.train_annotations, demo.val_annotations, tmp_path, how, "--epochs", 1)
    assert main(argv) == code
    (scaler,) = scalers
    log = (tmp_path / how / "out.log").read_text()
    if how == "inf":  # the scaler skipped it; not a failure, not counted
        assert (scaler.skipped, scaler.updates) == (1, 2) and "non-finite" not in log
    else:
        assert last_error(capfd).startswith("error: non-finite loss at step 1 ")
        assert scaler.updates == 2  # the skipped step still went through the scaler's bookkeeping


def test_failure_decision_table():
    assert is_failure(loss_finite=False, grads_finite=True, scaler_active=True)
    assert not is_failure(loss_finite=True, grads_finite=False, scaler_active=True)
    assert is_failure(loss_finite=True, grads_finite=False, scaler_active=False)
    assert not is_failure(loss_finite=True, grads_finite=True, scaler_active=False)


# ---- safe loading -----------------------------------------------------------------------------------

def test_pickled_checkpoint_needs_trust(demo, tmp_path):
    from open_clip_train.models import create_model

    model, _ = create_model(MODEL)
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, path)

    def cfg(*extra):
        return config_from_args(parse_args(args(demo.train_annotations, demo.val_annotations, tmp_path, "x",
                                                "--resume", path, *extra)))

    with pytest.raises(UserError, match="holds pickled objects .* --trust-checkpoint"):
        preflight.check_config(cfg())
    preflight.check_config(cfg("--trust-checkpoint"))  # fits this model: accepted
