"""Speed defaults for frozen towers and CPU runs: the --compile-frozen auto policy, the compile
fallback, the host allocator setting and the fused AdamW choice."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from open_clip_train import frozen_compile
from open_clip_train.freeze import FreezeCfg, TowerSchedule, apply_trainable, build_plan
from open_clip_train.frozen_compile import compile_frozen_trunk
from open_clip_train.frozen_compile import FrozenTrunkCompiler, worth_compiling
from open_clip_train.models import create_model
from open_clip_train.optim import OptimCfg, build_optimizer, make_groups


def _locked_tiny(unlock_at=None):
    torch.manual_seed(0)
    model, _ = create_model("tiny-convnext-cliptext")
    plan = build_plan(model, FreezeCfg(image=TowerSchedule(lock=True, unfreeze_at_epoch=unlock_at)), epochs=4)
    apply_trainable(model, list(plan.rules_at(0)))
    return model, plan


@pytest.mark.parametrize("per_step_s, steps_left, expected", [
    (3.2, 10, False),      # the benchmark's frozen ConvNeXtV2-Tiny, a 10-step phase: 13 s to save
    (3.2, 1000, True),     # ... a real phase: ~1280 s to save
    (0.005, 100000, False),  # a tiny model: 200 s over 100k steps is less than a compile
    (0.1, 15000, True),    # a GPU-sized forward over a COCO-length phase: 600 s
    (1.0, 0, False),
])
def test_worth_compiling_weighs_saving_against_the_budget(per_step_s, steps_left, expected):
    assert worth_compiling(per_step_s, steps_left) is expected


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, model, enable):
        self.calls.append(enable)
        return enable


def _steps(model, compiler, n, first_step=0):
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 32))
    for k in range(n):
        model(images, tokens)
        compiler.after_step(model, first_step + k + 1)


@pytest.mark.parametrize("budget, compiles", [(0.0, True), (1e9, False)])
def test_auto_times_the_frozen_forward_then_decides(monkeypatch, caplog, budget, compiles):
    model, _ = _locked_tiny()
    rec = _Recorder()
    monkeypatch.setattr(frozen_compile, "compile_frozen_trunk", rec)
    monkeypatch.setattr(frozen_compile, "COMPILE_BUDGET_S", budget)
    compiler = FrozenTrunkCompiler("auto", torch.device("cpu"))
    compiler.on_phase(model, step=0, phase_end_step=100)
    assert rec.calls == [False]  # eager while timing
    assert model.visual.trunk._forward_pre_hooks and model.visual.trunk._forward_hooks
    with caplog.at_level(logging.INFO):
        _steps(model, compiler, frozen_compile.TIMED_STEPS - 1)
        assert rec.calls == [False]  # not decided before TIMED_STEPS steps
        _steps(model, compiler, 1, first_step=frozen_compile.TIMED_STEPS - 1)
    assert rec.calls == [False, True] if compiles else rec.calls == [False]
    assert not model.visual.trunk._forward_pre_hooks and not model.visual.trunk._forward_hooks  # timers removed
    line = [r.getMessage() for r in caplog.records if "image trunk fully frozen" in r.getMessage()][-1]
    assert ("compiling it" in line) is compiles and "s of eager trunk forward per step" in line
    _steps(model, compiler, 3, first_step=10)
    assert len(rec.calls) == (2 if compiles else 1)  # decided once per phase


def test_modes_and_phase_changes(monkeypatch):
    model, plan = _locked_tiny(unlock_at=1)
    rec = _Recorder()
    monkeypatch.setattr(frozen_compile, "compile_frozen_trunk", rec)
    on = FrozenTrunkCompiler("on", torch.device("cpu"))
    on.on_phase(model, 0, 10)
    assert rec.calls == [True]
    apply_trainable(model, list(plan.rules_at(1)))  # the unlock: trunk trains, back to eager
    on.on_phase(model, 10, 40)
    assert rec.calls == [True, False]
    off = FrozenTrunkCompiler("off", torch.device("cpu"))
    apply_trainable(model, list(plan.rules_at(0)))
    off.on_phase(model, 0, 10)
    assert rec.calls[-1] is False and not model.visual.trunk._forward_hooks
    # feature capture (distill/headalign) keeps the trunk in Python: auto/on become off
    assert FrozenTrunkCompiler("on", torch.device("cpu"), allowed=False).mode == "off"
    with pytest.raises(ValueError):
        FrozenTrunkCompiler("sometimes", torch.device("cpu"))


def test_settled_only_after_timing_and_the_first_compiled_step(monkeypatch):
    """The trainer turns on glibc's memory retention once `settled`: never while the eager forward is
    being timed or before the first step that runs (and so compiles) the compiled trunk."""
    model, _ = _locked_tiny()
    monkeypatch.setattr(frozen_compile, "compile_frozen_trunk", _Recorder())
    monkeypatch.setattr(frozen_compile, "COMPILE_BUDGET_S", 0.0)
    auto = FrozenTrunkCompiler("auto", torch.device("cpu"))
    auto.on_phase(model, step=0, phase_end_step=100)
    for k in range(frozen_compile.TIMED_STEPS):
        assert not auto.settled
        _steps(model, auto, 1, first_step=k)
    assert not auto.settled  # decided to compile: the compile happens in the next step
    _steps(model, auto, 1, first_step=frozen_compile.TIMED_STEPS)
    assert auto.settled
    on = FrozenTrunkCompiler("on", torch.device("cpu"))
    on.on_phase(model, 0, 10)
    assert not on.settled
    _steps(model, on, 1)
    assert on.settled
    off = FrozenTrunkCompiler("off", torch.device("cpu"))
    off.on_phase(model, 0, 10)
    assert off.settled


def test_failed_compile_falls_back_to_the_eager_forward(monkeypatch, caplog):
    model, _ = _locked_tiny()
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model.encode_image(images)

    def broken(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no working C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert compile_frozen_trunk(model, True)
    with caplog.at_level(logging.WARNING):
        out = model.encode_image(images)
        out2 = model.encode_image(images)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(out2, eager, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if "compiling the frozen image trunk failed" in r.getMessage()]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0] and "more detail" not in warnings[0]


ALLOC_PROBE = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "retain":
        from open_clip_train.allocator import retain_freed_memory
        assert retain_freed_memory() is not None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    w, x = torch.randn(256, 1024), torch.randn(8192, 256)
    def step():  # like a training step: large temporaries of a few sizes, all freed at its end
        h = torch.nn.functional.gelu(x @ w)  # 32 MiB
        return float(((h * 2.0) @ w.t()).sum())
    for _ in range(10):  # warm-up: the retained heap settles
        step()
    per_step = []
    for _ in range(21):
        before = faults()
        step()
        per_step.append(faults() - before)
    print(sorted(per_step)[10])  # the median step: one-off events (a page migrated, a slipped buffer) aside
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    def faults_per_step(mode):
        out = subprocess.run([sys.executable, "-c", ALLOC_PROBE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    pages = (32 << 20) // 4096
    assert faults_per_step("default") > pages  # glibc maps the 32 MiB temporaries afresh every step
    # reused: the median step faults in at most a tenth of a fresh mapping (a loaded machine adds
    # some of its own; a CI run once saw one 64 MiB re-mapping in 20 steps, hence the median)
    assert faults_per_step("retain") < 0.1 * pages


def test_adamw_is_fused_when_every_param_allows_it():
    model, plan = _locked_tiny()
    cfg = OptimCfg(lr=1e-3)
    opt = build_optimizer(make_groups(model, plan.rules_at(0), cfg), cfg)
    assert opt.defaults["fused"] is True
