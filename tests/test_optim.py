"""Name-keyed param groups: split, lr scaling with the unlock ramp, adding groups mid-run,
coverage checks and the checkpoint layout round trip."""
import pytest
import torch
import torch.nn.functional as F

from open_clip_train.errors import UserError
from open_clip_train.freeze import FreezeCfg, TowerSchedule, apply_trainable, build_plan
from open_clip_train.models import create_model
from open_clip_train.optim import (
    OptimCfg, add_groups, apply_lr, build_optimizer, check_coverage, decays, group_layout, groups_from_layout,
    make_groups,
)

OPT = OptimCfg(lr=1e-3, weight_decay=0.2)


def _model():
    torch.manual_seed(0)
    return create_model("tiny-convnext-cliptext")[0]


def _unlock_plan(model, **kw):
    cfg = FreezeCfg(image=TowerSchedule(lock=True, unfreeze_at_epoch=1, unfreeze_groups=2), new_lr_scale=0.1, **kw)
    return build_plan(model, cfg, epochs=3)


def _loss(model):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    texts = torch.randint(1, 100, (4, 32), generator=g)
    out = model(images, texts)
    logits = out["logit_scale"].exp() * out["image_features"] @ out["text_features"].T
    return F.cross_entropy(logits, torch.arange(4))


def _steps(model, opt, n):
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        _loss(model).backward()
        opt.step()


def test_make_groups_split_by_origin_scale_and_wd():
    model = _model()
    plan = _unlock_plan(model, lr_mults=(("text_projection", 2.0),))
    rules = plan.rules_at(1)
    groups = make_groups(model, rules, OPT, ramp_start=7, ramp_steps=5)
    params = dict(model.named_parameters())

    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(rules)  # every rule's param exactly once
    assert len(names) == len(set(names))
    keys = {(g["name"].split("/")[0], g["lr_scale"], g["weight_decay"]) for g in groups}
    assert len(keys) == len(groups)  # one group per (origin, scale, wd)
    for g in groups:
        for n, p in zip(g["param_names"], g["params"]):
            assert params[n] is p
            assert rules[n].lr_scale == g["lr_scale"]
            assert g["weight_decay"] == (0.2 if decays(n, p) else 0.0)
        assert g["lr"] == pytest.approx(OPT.lr * g["lr_scale"])  # scaled even with --skip-scheduler
        unlock = g["name"].startswith("unlock_image@1")
        assert (g["ramp_start"], g["ramp_steps"]) == ((7, 5) if unlock else (0, 0))

    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"base", "base/no_wd", "base/x2", "unlock_image@1/x0.1", "unlock_image@1/x0.1/no_wd"}
    assert by_name["base/x2"]["param_names"] == ["text_projection"]
    assert by_name["unlock_image@1/x0.1"]["weight_decay"] == 0.2
    assert by_name["unlock_image@1/x0.1/no_wd"]["weight_decay"] == 0.0
    assert all(n.startswith("visual.trunk.") for n in by_name["unlock_image@1/x0.1"]["param_names"])


def test_add_groups_leaves_existing_groups_and_state_untouched():
    model = _model()
    plan = _unlock_plan(model)
    apply_trainable(model, list(plan.rules_at(0)))
    opt = build_optimizer(make_groups(model, plan.rules_at(0), OPT), OPT)
    _steps(model, opt, 3)
    before_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups
                    for p in g["params"]}
    before_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    before_params = [list(g["params"]) for g in opt.param_groups]

    # the unlock, as enter_epoch does it
    rules = plan.rules_at(1)
    apply_trainable(model, list(rules))
    new = {n: rules[n] for u in plan.unlocks_at(1) for n in u.names}
    add_groups(opt, make_groups(model, new, OPT, ramp_start=3, ramp_steps=4))
    check_coverage(model, opt)

    n_old = len(before_groups)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups[:n_old]] == before_groups
    assert all(a is b for g, ps in zip(opt.param_groups, before_params) for a, b in zip(g["params"], ps))
    for g in opt.param_groups[:n_old]:
        for p in g["params"]:
            for k, v in before_state[id(p)].items():
                assert torch.equal(opt.state[p][k], v), k
    new_params = [p for g in opt.param_groups[n_old:] for p in g["params"]]
    assert new_params and all(p not in opt.state for p in new_params)
    assert all(g["name"].startswith("unlock_image@1") for g in opt.param_groups[n_old:])

    _steps(model, opt, 1)  # the new groups train from fresh state; old state moves on by one step
    assert all(float(opt.state[p]["step"]) == 1 for p in new_params)
    assert float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 4

    with pytest.raises(RuntimeError, match="repeats parameters"):
        add_groups(opt, make_groups(model, new, OPT))


def test_apply_lr_scale_and_ramp():
    model = _model()
    plan = _unlock_plan(model)
    apply_trainable(model, list(plan.rules_at(0)))
    opt = build_optimizer(make_groups(model, plan.rules_at(0), OPT), OPT)
    rules = plan.rules_at(1)
    apply_trainable(model, list(rules))
    add_groups(opt, make_groups(model, {n: rules[n] for n in plan.unlocks[0].names}, OPT,
                                ramp_start=10, ramp_steps=4))
    old = [g for g in opt.param_groups if g["name"].startswith("base")]
    new = [g for g in opt.param_groups if g["name"].startswith("unlock")]
    assert old and new
    for step, expected_ramp in [(10, 0.25), (11, 0.5), (13, 1.0), (40, 1.0)]:
        apply_lr(opt, step, base_lr=2.0)
        assert all(g["lr"] == pytest.approx(2.0) for g in old)
        assert all(g["lr"] == pytest.approx(2.0 * 0.1 * expected_ramp) for g in new)


def test_check_coverage_catches_missing_duplicate_and_frozen():
    model = _model()
    plan = _unlock_plan(model)
    apply_trainable(model, list(plan.rules_at(0)))
    opt = build_optimizer(make_groups(model, plan.rules_at(0), OPT), OPT)
    check_coverage(model, opt)  # consistent

    frozen = model.visual.trunk.stem[0].weight
    frozen.requires_grad_(True)  # trainable but in no group
    with pytest.raises(RuntimeError, match="visual.trunk.stem.0.weight is in no param group"):
        check_coverage(model, opt)
    frozen.requires_grad_(False)

    dup = opt.param_groups[0]["params"][0]
    opt.param_groups[1]["params"].append(dup)
    with pytest.raises(RuntimeError, match="two param groups"):
        check_coverage(model, opt)
    opt.param_groups[1]["params"].pop()

    model.text_projection.requires_grad_(False)  # frozen but still optimised
    with pytest.raises(RuntimeError, match="frozen parameter text_projection is still in param group"):
        check_coverage(model, opt)


def test_group_layout_round_trip_by_name():
    model = _model()
    plan = _unlock_plan(model, lr_mults=(("visual\\.head", 3.0),))
    rules = plan.rules_at(1)
    apply_trainable(model, list(rules))
    opt = build_optimizer(make_groups(model, rules, OPT, ramp_start=5, ramp_steps=2), OPT)
    _steps(model, opt, 2)
    layout = group_layout(opt)
    sd = opt.state_dict()

    fresh = _model()  # same architecture, other parameter objects
    apply_trainable(fresh, list(rules))
    opt2 = build_optimizer(groups_from_layout(fresh, layout), OPT)
    opt2.load_state_dict(sd)
    assert group_layout(opt2) == layout
    params = dict(fresh.named_parameters())
    for g in opt2.param_groups:
        assert [params[n] for n in g["param_names"]] == g["params"]
    # state landed on the same-named parameters
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g_old, g_new in zip(opt.param_groups, opt2.param_groups):
        for p_old, p_new, n in zip(g_old["params"], g_new["params"], g_new["param_names"]):
            assert name_of[id(p_old)] == n
            assert torch.equal(opt.state[p_old]["exp_avg"], opt2.state[p_new]["exp_avg"])
    check_coverage(fresh, opt2)

    bad = [dict(layout[0], param_names=layout[0]["param_names"] + ["visual.nope.weight"])]
    with pytest.raises(UserError, match="visual.nope.weight"):
        groups_from_layout(fresh, bad)


def test_build_optimizer_names_and_errors():
    model = _model()
    groups = make_groups(model, build_plan(model, FreezeCfg(), 1).rules_at(0), OPT)
    assert isinstance(build_optimizer(groups, OPT), torch.optim.AdamW)
    timm_opt = build_optimizer(make_groups(model, build_plan(model, FreezeCfg(), 1).rules_at(0), OPT),
                               OptimCfg(name="timm/lamb", lr=1e-3, beta1=None, beta2=None, eps=None))
    assert type(timm_opt).__name__ == "Lamb"
    assert {g["weight_decay"] for g in timm_opt.param_groups} == {0.0, 0.2}  # our wd split kept
    with pytest.raises(UserError, match="--opt nope"):
        build_optimizer(groups, OptimCfg(name="nope"))
    with pytest.raises(UserError, match="nothing to train"):
        build_optimizer([], OPT)
