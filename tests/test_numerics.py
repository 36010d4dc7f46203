"""numerics: one vector carries the step's decisions (non-finite loss, non-finite gradients unless
a scaler handles them, bad samples, stop signals), read back once, at once (`read_flags`) or a
step later (`PendingAgreement`), with the failed update dropped on the device meanwhile."""
import signal

import torch

from open_clip_train import numerics

CPU = torch.device("cpu")


def agree_on_step(*args, **kwargs):
    """The flags read at once, as the trainer does for an optimizer without a device skip."""
    return numerics.read_flags(numerics.step_flags(*args, **kwargs).tolist())


def _params(value):
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), value)
    return [p]


def test_a_healthy_step_agrees_on_nothing():
    a = agree_on_step({"loss": torch.tensor(1.0)}, None, _params(0.5), False, 0, CPU)
    assert (a.loss_bad, a.grads_bad, a.bad_samples, a.stop_signum) == (False, False, 0, 0)


def test_each_decision_reaches_its_field():
    a = agree_on_step({"loss": torch.tensor(float("nan"))}, None, _params(0.5), False, 3, CPU,
                      stop_signum=int(signal.SIGTERM))
    assert (a.loss_bad, a.grads_bad, a.bad_samples, a.stop_signum) == (True, False, 3, int(signal.SIGTERM))
    a = agree_on_step({"loss": torch.tensor(1.0)}, None, _params(float("inf")), False, 0, CPU)
    assert a.grads_bad and not a.loss_bad
    # clipping's total norm stands for the gradients when given
    a = agree_on_step({"loss": torch.tensor(1.0)}, torch.tensor(float("inf")), _params(0.5), False, 0, CPU)
    assert a.grads_bad
    # a grad scaler checks gradients itself
    a = agree_on_step({"loss": torch.tensor(1.0)}, None, _params(float("inf")), True, 0, CPU)
    assert not a.grads_bad


def test_the_decisions_are_read_back_once(monkeypatch):
    """Every flag is reduced in one tensor and read to the host once (the step's one sync)."""
    reduced = []

    def spy(values):
        reduced.append(values.clone())
        return values

    monkeypatch.setattr(numerics.dist_env, "all_reduce_sum", spy)
    agree_on_step({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, None, _params(0.5), False, 2, CPU,
                  stop_signum=int(signal.SIGUSR1))
    assert len(reduced) == 1 and reduced[0].device == CPU
    assert reduced[0].tolist()[:3] == [0.0, 0.0, 2.0] and sum(reduced[0].tolist()[3:]) == 1.0


def test_the_device_failure_flag_is_the_host_decision_table():
    for loss_ok in (True, False):
        for grads_ok in (True, False):
            for scaler in (True, False):
                terms = {"loss": torch.tensor(1.0 if loss_ok else float("nan"))}
                flags = numerics.step_flags(terms, None, _params(0.5 if grads_ok else float("inf")), scaler, 0, CPU)
                assert bool(numerics.failure_flag(flags, scaler)) == numerics.is_failure(loss_ok, grads_ok, scaler)


def test_a_pending_agreement_reads_what_agree_on_step_reads():
    args = ({"loss": torch.tensor(float("nan"))}, None, _params(0.5), False, 5, CPU, int(signal.SIGUSR1))
    pending = numerics.PendingAgreement.start(numerics.step_flags(*args), 7, "epoch 0, step 8 of 9", args[0])
    assert pending.read() == agree_on_step(*args)
    assert (pending.step, pending.where) == (7, "epoch 0, step 8 of 9")


def _adamw(value):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(4)
    opt.step()  # moments to keep or not
    p.grad = torch.full((4,), value)
    return p, opt


def test_step_unless_drops_the_update_inside_the_fused_kernel():
    p, opt = _adamw(float("nan"))
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    numerics.step_unless(opt, torch.tensor(True))
    assert torch.equal(p, before[0]) and all(torch.equal(v, opt.state[p][k]) for k, v in before[1].items())
    assert not hasattr(opt, "found_inf")  # the contract's attributes are gone after the step
    # ... and a passing flag is the plain step, bit for bit
    p, opt = _adamw(0.5)
    q, ref = _adamw(0.5)
    numerics.step_unless(opt, torch.tensor(False))
    ref.step()
    assert torch.equal(p, q) and all(torch.equal(v, ref.state[q][k]) for k, v in opt.state[p].items())


def test_poisoned_gradients_make_a_scaler_skip_and_a_passing_flag_changes_nothing():
    p, opt = _adamw(0.5)
    numerics.poison_gradients(opt, torch.tensor(False))
    assert torch.equal(p.grad, torch.full((4,), 0.5))
    numerics.poison_gradients(opt, torch.tensor(True))
    assert p.grad[0].isnan() and torch.equal(p.grad[1:], torch.full((3,), 0.5))
    found_inf = torch.zeros(())  # the check GradScaler runs before its step
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad], found_inf, torch.ones(()))
    assert found_inf.item() == 1.0
