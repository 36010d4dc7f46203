"""Learning-rate schedules against hand-computed tables (upstream open_clip semantics)."""
import math

import pytest

from open_clip_train.errors import UserError
from open_clip_train.schedule import ScheduleCfg, lr_at, ramp


def _table(cfg: ScheduleCfg, steps):
    return [lr_at(s, cfg) for s in steps]


def test_cosine_with_warmup():
    cfg = ScheduleCfg("cosine", base_lr=1.0, warmup_steps=4, total_steps=12)
    # warm-up: base * (step + 1) / warmup; then 0.5 * (1 + cos(pi * (step - 4) / 8))
    expected = {
        0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0,
        4: 1.0,
        6: 0.5 * (1 + math.cos(math.pi / 4)),  # 0.853553...
        8: 0.5,
        10: 0.5 * (1 + math.cos(3 * math.pi / 4)),  # 0.146446...
        12: 0.0,
    }
    assert _table(cfg, expected) == pytest.approx(list(expected.values()), abs=1e-12)
    assert lr_at(6, cfg) == pytest.approx(0.8535533905932737)
    # monotone decay after warm-up
    after = _table(cfg, range(4, 13))
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_cosine_scales_with_base_lr():
    a = ScheduleCfg("cosine", base_lr=1.0, warmup_steps=2, total_steps=10)
    b = ScheduleCfg("cosine", base_lr=5e-4, warmup_steps=2, total_steps=10)
    for s in range(11):
        assert lr_at(s, b) == pytest.approx(5e-4 * lr_at(s, a))


def test_const():
    cfg = ScheduleCfg("const", base_lr=2.0, warmup_steps=2, total_steps=10)
    assert _table(cfg, range(6)) == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    no_warmup = ScheduleCfg("const", base_lr=2.0, warmup_steps=0, total_steps=10)
    assert _table(no_warmup, [0, 5, 9]) == [2.0, 2.0, 2.0]


def test_const_cooldown_linear():
    # cooldown starts at step total - cooldown = 6 and ends at cooldown_end_lr at step 10
    cfg = ScheduleCfg("const-cooldown", base_lr=1.0, warmup_steps=2, total_steps=10, cooldown_steps=4,
                      cooldown_power=1.0, cooldown_end_lr=0.1)
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]
    assert _table(cfg, range(11)) == pytest.approx(expected)


def test_const_cooldown_power_and_clamp():
    cfg = ScheduleCfg("const-cooldown", base_lr=1.0, warmup_steps=0, total_steps=10, cooldown_steps=4,
                      cooldown_power=2.0, cooldown_end_lr=0.1)
    # step 8: frac 0.5 -> (0.5 ** 2) * 0.9 + 0.1
    assert lr_at(8, cfg) == pytest.approx(0.325)
    half = ScheduleCfg("const-cooldown", base_lr=1.0, warmup_steps=0, total_steps=10, cooldown_steps=4,
                       cooldown_power=0.5, cooldown_end_lr=0.0)
    # past the end the value stays at the end lr (a real number, not complex)
    assert lr_at(12, half) == 0.0
    assert isinstance(lr_at(12, half), float)


def test_ramp():
    # starts at 1/K on the unlock step, reaches 1 after K steps, never exceeds 1
    assert [ramp(s, 10, 4) for s in (8, 9, 10, 11, 12, 13, 14, 50)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 0, 0) == 1.0
    assert ramp(123, 500, 0) == 1.0


def test_unknown_schedule_fails_at_build():
    with pytest.raises(UserError, match="--lr-scheduler 'cosin'"):
        ScheduleCfg("cosin", base_lr=1.0, warmup_steps=10, total_steps=100)
    with pytest.raises(UserError, match="must be >= 0"):
        ScheduleCfg("const", base_lr=1.0, warmup_steps=-1, total_steps=100)
