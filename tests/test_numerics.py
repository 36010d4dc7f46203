"""numerics.agree_on_step: one vector carries the step's decisions (non-finite loss, non-finite
gradients unless a scaler handles them, bad samples, stop signals), read back once."""
import signal

import torch

from open_clip_train import numerics
from open_clip_train.numerics import agree_on_step

CPU = torch.device("cpu")


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
