"""The freezing engine: layer enumeration, per-epoch plans, flag validation, frozen parts in eval
mode, and frozen prefixes that neither receive gradients nor keep activations for backward."""
import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from open_clip_train.errors import UserError
from open_clip_train.freeze import (
    SHARED, FreezeCfg, TowerSchedule, apply_trainable, build_plan, count_trainable, freeze_bn_stats,
    install_frozen_eval, tower_layout,
)
from open_clip_train.models import create_model
from open_clip_train.optim import OptimCfg, build_optimizer, check_coverage, make_groups

CLIP_TEXT = "tiny-convnext-cliptext"
GPT2 = "tiny-convnext-gpt2"


def _model(name=CLIP_TEXT, device="cpu"):
    torch.manual_seed(0)
    return create_model(name, device=device)[0]


def _cfg(image=None, text=None, **kw) -> FreezeCfg:
    return FreezeCfg(image=TowerSchedule(**(image or {})), text=TowerSchedule(**(text or {})), **kw)


def _numel(model, names):
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def _applied(model, cfg, epoch=0, epochs=4):
    plan = build_plan(model, cfg, epochs)
    apply_trainable(model, list(plan.rules_at(epoch)))
    return plan


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize("name, n_image, n_text, text_head", [
    (CLIP_TEXT, 11, 4, []),  # text: [emb], block 0, [block 1 + ln_final], [text_projection]
    (GPT2, 11, 3, ["text.proj.0.weight", "text.proj.2.weight"]),  # [wte+wpe], h.0, [h.1 + ln_f]; mlp proj head
])
def test_layout_covers_every_param_once(name, n_image, n_text, text_head):
    model = _model(name)
    layouts = tower_layout(model)
    enumerated = [n for t in layouts.values() for n in t.names]
    all_names = [n for n, _ in model.named_parameters()]
    assert len(enumerated) == len(set(enumerated))
    assert sorted(enumerated + [n for n in all_names if n in SHARED]) == sorted(all_names)
    image, text = layouts["image"], layouts["text"]
    assert len(image.groups) == n_image and len(text.groups) == n_text
    assert image.head == [n for n in all_names if n.startswith("visual.head.")]  # attention-pool head
    assert text.head == text_head
    assert image.groups[0] == [n for n in all_names if n.startswith("visual.trunk.stem.")]
    assert image.groups[-1] == [n for n in all_names if n.startswith("visual.trunk.head.norm.")]
    # timm's group_matcher puts a stage's downsample with its first block
    assert any("stages.1.downsample" in n for n in image.groups[2]) and any("stages.1.blocks.0" in n for n in image.groups[2])


@pytest.mark.parametrize("name, lock_image, lock_text, expected", [
    ("convnextv2_tiny_gpt2-512", False, False, (30070400, 125259008, 155329409)),
    ("convnextv2_tiny_gpt2-512", True, True, (2203904, 819200, 3023105)),
    ("convnextv2_tiny_cliptext-512", True, False, (2203904, 63428096, 65632001)),
    ("convnext_base_w_absattn", True, True, (3856000, 0, 3856001)),
    ("convnext_base_w_absattn_proj", True, True, (4265600, 0, 4265601)),
])
def test_seed_init_counts(name, lock_image, lock_text, expected):
    model = _model(name, device="meta")
    _applied(model, _cfg(image=dict(lock=lock_image), text=dict(lock=lock_text)))
    counts = count_trainable(model)
    assert (counts["visual"], counts["text"], counts["total"]) == expected


# ------------------------------------------------------------------------------------ plans


def test_dry_run_example_counts_per_phase():
    """--lock-image --unfreeze-image-at-epoch 2 --unlocked-image-groups 3 --epochs 4"""
    model = _model()
    layout = tower_layout(model)["image"]
    plan = build_plan(model, _cfg(image=dict(lock=True, unfreeze_at_epoch=2, unfreeze_groups=3)), epochs=4)
    phases = plan.phases()
    assert [(p.start, p.end) for p in phases] == [(0, 2), (2, 4)]
    text_total = _numel(model, tower_layout(model)["text"].names)
    expected_visual = [_numel(model, layout.head), _numel(model, layout.head + [n for g in layout.groups[-3:] for n in g])]
    assert expected_visual == [18304, 103840]
    for phase, visual in zip(phases, expected_visual):
        apply_trainable(model, list(phase.rules))
        assert count_trainable(model) == {"visual": visual, "text": text_total, "total": visual + text_total + 1}
    assert plan.rules_at(1) == plan.phases()[0].rules and plan.rules_at(3) == plan.phases()[1].rules
    unlocked = set(plan.unlocks[0].names)
    assert unlocked == {n for g in layout.groups[-3:] for n in g}
    assert all(plan.rules_at(2)[n].lr_scale == pytest.approx(0.1) for n in unlocked)
    assert plan.notes == ["image: locked by whole tower (11 groups)"]
    assert plan.describe_tower("image", plan.rules_at(2)) == "image: last 3/11 groups trainable, head trainable"


def test_lock_image_unlocked_groups_counts_from_output_end():
    model = _model()
    layout = tower_layout(model)["image"]
    plan = _applied(model, _cfg(image=dict(lock=True, unlocked_groups=2)))
    trainable = _trainable(model)
    assert all(n not in trainable for g in layout.groups[:-2] for n in g)
    assert all(n in trainable for g in layout.groups[-2:] for n in g)
    assert set(layout.head) <= trainable  # the head is new to the trunk: stays trainable
    assert "image: locked by layer count: last 2/11 groups trainable" in plan.notes


def test_lock_text_alone_on_clip_text_tower():
    model = _model()
    text = tower_layout(model)["text"]
    plan = _applied(model, _cfg(text=dict(lock=True)))
    trainable = _trainable(model)
    assert not trainable & set(text.names)  # incl. ln_final and text_projection
    assert {n for n, _ in model.named_parameters() if n.startswith("visual.")} <= trainable
    assert "logit_scale" in trainable
    assert count_trainable(model)["text"] == 0
    assert plan.notes == ["text: locked by whole tower (4 groups)"]

    model = _model()
    _applied(model, _cfg(text=dict(lock=True, unlocked_groups=1)))
    assert _trainable(model) & set(text.names) == {"text_projection"}
    model = _model()
    _applied(model, _cfg(text=dict(lock=True, unlocked_groups=2)))
    assert _trainable(model) & set(text.names) == set(text.groups[-2] + text.groups[-1])
    assert "ln_final.weight" in text.groups[-2]


def test_lock_text_gpt2_keeps_mlp_proj():
    model = _model(GPT2)
    _applied(model, _cfg(text=dict(lock=True)))
    text_trainable = {n for n in _trainable(model) if n.startswith("text.")}
    assert text_trainable == {"text.proj.0.weight", "text.proj.2.weight"}


def test_priority_pattern_over_layer_count_over_whole_tower():
    model = _model()
    plan = _applied(model, _cfg(image=dict(lock=True, unlocked_groups=3), text=dict(lock=True),
                                lock_patterns=(r"visual\.trunk\.stem\.",)))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    image_frozen = {n for n in frozen if n.startswith("visual.")}
    assert image_frozen == {n for n, _ in model.named_parameters() if n.startswith("visual.trunk.stem.")}
    assert any("image: --lock-pattern wins over --lock-image" in n for n in plan.notes)
    assert "image: froze 4 params by --lock-pattern" in plan.notes
    assert "text: locked by whole tower (4 groups)" in plan.notes  # no pattern hit in text: lock applies

    model = _model()
    plan = _applied(model, _cfg(image=dict(lock=True, unlocked_groups=3)))
    assert plan.notes == ["image: locked by layer count: last 3/11 groups trainable"]


def test_lock_pattern_reaches_shared_params():
    model = _model()
    plan = _applied(model, _cfg(lock_patterns=("^logit_scale$",)))
    assert not model.logit_scale.requires_grad
    assert "logit_scale" not in plan.rules_at(0)
    assert "shared: froze logit_scale by --lock-pattern" in plan.notes


def test_lr_mult_longest_wins_and_zero_freezes():
    model = _model()
    plan = build_plan(model, _cfg(image=dict(lock=True, unfreeze_at_epoch=1), lr_mults=(
        ("visual", 0.5), (r"visual\.head", 2.0), (r"visual\.head\.pool\.proj", 0.0), ("text_projection", 0.0),
    )), epochs=2)
    rules0 = plan.rules_at(0)
    assert rules0["visual.head.pool.qkv.weight"].lr_scale == 2.0  # 'visual\.head' beats 'visual'
    assert "visual.head.pool.proj.weight" not in rules0  # 0 = frozen
    assert "text_projection" not in rules0
    assert rules0["token_embedding.weight"].lr_scale == 1.0
    rules1 = plan.rules_at(1)
    assert rules1["visual.trunk.stem.0.weight"].lr_scale == pytest.approx(0.1 * 0.5)  # unlock scale x mult
    assert "visual.head.pool.proj.weight" not in rules1 and "text_projection" not in rules1  # frozen all run
    apply_trainable(model, list(rules1))
    opt = build_optimizer(make_groups(model, rules1, OptimCfg()), OptimCfg())
    check_coverage(model, opt)
    in_opt = {n for g in opt.param_groups for n in g["param_names"]}
    assert "text_projection" not in in_opt and not model.text_projection.requires_grad


def test_hf_layernorm_rule():
    """Upstream's HF lock keeps params of modules named 'LayerNorm' trainable unless
    --lock-text-freeze-layer-norm."""
    from transformers import BertConfig, BertModel

    class HFText(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16))
            self.proj = nn.Linear(16, 8, bias=False)

    def model_with_hf_text():
        model = _model(GPT2)
        model.text = HFText()
        return model

    model = model_with_hf_text()
    layout = tower_layout(model)["text"]
    assert len(layout.groups) == 3 and layout.head == ["text.proj.weight"]
    text_names = set(layout.names)
    layer_norm = {n for n in text_names if "LayerNorm" in n.split(".")}
    assert len(layer_norm) == 10  # embeddings + 2 per layer, weight and bias

    _applied(model, _cfg(text=dict(lock=True)))
    assert _trainable(model) & text_names == layer_norm | {"text.proj.weight"}

    model = model_with_hf_text()
    _applied(model, _cfg(text=dict(lock=True, freeze_norm=True)))
    assert _trainable(model) & text_names == {"text.proj.weight"}

    model = model_with_hf_text()
    _applied(model, _cfg(text=dict(lock=True, unlocked_groups=1)))
    last = {n for n in text_names if n.startswith(("text.transformer.encoder.layer.1.", "text.transformer.pooler."))}
    assert _trainable(model) & text_names == last | layer_norm | {"text.proj.weight"}


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("cfg, epochs, message", [
    (_cfg(image=dict(unfreeze_at_epoch=1)), 4, "--unfreeze-image-at-epoch 1: the image tower is not locked"),
    (_cfg(text=dict(unfreeze_at_epoch=1)), 4, "--unfreeze-text-at-epoch 1: the text tower is not locked"),
    (_cfg(image=dict(lock=True, unlocked_groups=-1)), 4, "--lock-image-unlocked-groups -1: must be between 0 and 11"),
    (_cfg(image=dict(lock=True, unlocked_groups=12)), 4, "--lock-image-unlocked-groups 12: must be between 0 and 11"),
    (_cfg(text=dict(lock=True, unlocked_groups=5)), 4, "--lock-text-unlocked-layers 5: must be between 0 and 4"),
    (_cfg(image=dict(unlocked_groups=2)), 4, "--lock-image-unlocked-groups needs --lock-image"),
    (_cfg(image=dict(lock=True, unfreeze_at_epoch=1, unfreeze_groups=12)), 4,
     "--unlocked-image-groups 12: must be between 1 and 11"),
    (_cfg(image=dict(lock=True, unfreeze_at_epoch=1, unfreeze_groups=-2)), 4,
     "--unlocked-image-groups -2: must be between 1 and 11"),
    (_cfg(text=dict(lock=True, unfreeze_at_epoch=1, unfreeze_groups=0)), 4,
     "--unlocked-text-layers 0: must be between 1 and 4"),
    (_cfg(lock_patterns=("no_such_param",)), 4, "--lock-pattern 'no_such_param' matches no parameter"),
    (_cfg(lr_mults=(("no_such_param", 0.5),)), 4, "--lr-mult pattern 'no_such_param' matches no parameter"),
    (_cfg(image=dict(lock=True), lr_mults=((r"visual\.trunk", 0.5),)), 4,
     r"--lr-mult visual\.trunk=0.5 only matches parameters that stay frozen all run"),
    (_cfg(lr_mults=(("visual", 0.5), ("visual", 2.0))), 4, "--lr-mult pattern 'visual' is given twice"),
    (_cfg(image=dict(lock=True, unfreeze_at_epoch=5)), 4, "--unfreeze-image-at-epoch 5 is beyond the run (--epochs 4)"),
    (_cfg(image=dict(lock=True, unfreeze_at_epoch=0)), 4, "--unfreeze-image-at-epoch must be >= 1"),
    (_cfg(image=dict(unfreeze_groups=2)), 4, "--unlocked-image-groups needs --unfreeze-image-at-epoch"),
    (_cfg(text=dict(unfreeze_groups=2)), 4, "--unlocked-text-layers needs --unfreeze-text-at-epoch"),
    (_cfg(image=dict(lock=True, unlocked_groups=3, unfreeze_at_epoch=1, unfreeze_groups=3)), 4,
     "--unfreeze-image-at-epoch 1: nothing left to unlock in the image tower"),
    (_cfg(lock_patterns=("visual[",)), 4, "invalid parameter-name regex"),
])
def test_bad_input_is_one_user_error(cfg, epochs, message):
    with pytest.raises(UserError) as e:
        build_plan(_model(), cfg, epochs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_library_messages_take_their_spelling_from_the_front_end(monkeypatch):
    """The library names settings; the command line says how they are spelled (errors.flag)."""
    from open_clip_train import errors

    monkeypatch.setattr(errors, "_SPELLING", {})  # the library used from code, no command line
    with pytest.raises(UserError, match=r"^unfreeze_image_at_epoch 5 is beyond the run \(epochs 4\)"):
        build_plan(_model(), _cfg(image=dict(lock=True, unfreeze_at_epoch=5)), 4)
    errors.register_flags({"unfreeze_image_at_epoch": "--unfreeze-image-at-epoch", "epochs": "--epochs"})
    with pytest.raises(UserError, match=r"^--unfreeze-image-at-epoch 5 is beyond the run \(--epochs 4\)"):
        build_plan(_model(), _cfg(image=dict(lock=True, unfreeze_at_epoch=5)), 4)


def test_unlock_epoch_never_reached_warns(caplog):
    with caplog.at_level(logging.WARNING):
        plan = build_plan(_model(), _cfg(image=dict(lock=True, unfreeze_at_epoch=4)), epochs=4)
    msg = "--unfreeze-image-at-epoch 4 is never reached: the run ends after epoch 4"
    assert msg in caplog.text and msg in plan.notes
    assert len(plan.phases()) == 1


def test_cli_prints_one_error_line_and_exits_2(capsys):
    from open_clip_train.main import main

    rc = main(["--model", CLIP_TEXT, "--unfreeze-image-at-epoch", "2", "--epochs", "4", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["error: --unfreeze-image-at-epoch 2: the image tower is not locked "
                   "(add --lock-image or a --lock-pattern for it)"]


# ------------------------------------------------------------------------------------ train mode


def _with_drop_path(model, p=0.5):
    for stage in model.visual.trunk.stages:
        for block in stage.blocks:
            block.drop_path = DropPath(p)
    return model


def _stochastic(module, x, tries=3) -> bool:
    outs = []
    for _ in range(tries):
        out = module(x)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return any(not torch.equal(outs[0], o) for o in outs[1:])


def _train_mode_model():
    model = _with_drop_path(_model(GPT2))
    # image: last 2 groups (stages.3.blocks.1, head norm) train; text: h.1 + ln_f train, h.0 and embeddings frozen
    _applied(model, _cfg(image=dict(lock=True, unlocked_groups=2), text=dict(lock=True, unlocked_groups=1)))
    return model


def _assert_frozen_eval(model):
    trunk = model.visual.trunk
    frozen_block, trainable_block = trunk.stages[0].blocks[0], trunk.stages[3].blocks[1]
    assert not frozen_block.drop_path.training and trainable_block.drop_path.training
    h0, h1 = model.text.transformer.h
    assert not h0.mlp.dropout.training and not h0.attn.attn_dropout.training
    assert h1.mlp.dropout.training and h1.attn.attn_dropout.training
    assert model.visual.head.training and model.text.proj.training

    torch.manual_seed(0)
    x = torch.randn(8, 24, 8, 8)
    assert not _stochastic(frozen_block, x)
    assert _stochastic(trainable_block, torch.randn(8, 64, 2, 2))
    hidden = torch.randn(2, 6, 64)
    assert not _stochastic(h0, hidden)
    assert _stochastic(h1, hidden)


def test_frozen_parts_run_in_eval_mode():
    model = _train_mode_model()
    install_frozen_eval(model)
    _assert_frozen_eval(model)  # applied at install already
    model.eval()
    assert not any(m.training for m in model.modules())
    assert model.train() is model
    _assert_frozen_eval(model)  # re-applied on every train()

    apply_trainable(model, [n for n, _ in model.named_parameters()])  # an unlock: the next train() follows
    model.train()
    assert all(m.training for m in model.modules())


def test_dropout_in_a_frozen_prefix_runs_in_eval_mode():
    # GPT2's embedding dropout has no parameters of its own: it sits after the frozen wte/wpe, so it
    # is part of the frozen prefix; once the embeddings train, it is back in train mode.
    model = _train_mode_model()
    gpt2 = model.text.transformer
    assert gpt2.drop.p > 0
    install_frozen_eval(model)
    model.train()
    assert not gpt2.drop.training
    ids = torch.randint(0, 50, (4, 8))
    emb = gpt2.wte(ids)
    assert torch.equal(gpt2.drop(emb), emb)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad or n.startswith("text.transformer.wpe")]
    apply_trainable(model, trainable)  # the position embeddings train: the prefix ends before `drop`
    model.train()
    assert gpt2.drop.training and not gpt2.h[0].mlp.dropout.training


def test_frozen_train_mode_keeps_upstream_behaviour():
    model = _train_mode_model()  # no install_frozen_eval: --frozen-train-mode
    model.train()
    frozen_block = model.visual.trunk.stages[0].blocks[0]
    assert frozen_block.drop_path.training and model.text.transformer.h[0].mlp.dropout.training
    torch.manual_seed(0)
    assert _stochastic(frozen_block, torch.randn(8, 24, 8, 8))


def test_frozen_eval_through_ddp_and_deepcopy(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _train_mode_model()
    install_frozen_eval(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        ddp.eval()
        assert not model.visual.trunk.stages[3].blocks[1].drop_path.training
        ddp.train()
        _assert_frozen_eval(model)
    finally:
        dist.destroy_process_group()

    model.eval()
    twin = copy.deepcopy(model)  # e.g. an EMA copy: its train() must act on itself
    twin.train()
    _assert_frozen_eval(twin)
    assert not model.training and not model.visual.trunk.stages[3].blocks[1].drop_path.training


def test_freeze_bn_stats_survives_train_calls():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
            self.text = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    model = Toy()
    for p in [*model.visual.parameters(), *model.text.parameters()]:
        p.requires_grad_(False)
    freeze_bn_stats(model)
    for _ in range(2):
        model.eval()
        model.train()
        assert not model.visual[1].training  # frozen image BN: eval
        assert model.visual[2].training  # only BN, as upstream's flag (--frozen-train-mode)
        assert model.text[1].training  # the image flag leaves text alone
    before = model.visual[1].running_mean.clone()
    model.visual(torch.randn(4, 3, 6, 6))
    assert torch.equal(model.visual[1].running_mean, before)


# ------------------------------------------------------------------------------------ gradients


def _contrastive_loss(out):
    logits = out["logit_scale"].exp() * out["image_features"] @ out["text_features"].T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _batch(n=4, vocab=100):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(1, vocab, (n, 32), generator=g)


def _graph_params(t: torch.Tensor) -> set:
    """ids of the leaf tensors whose gradient the autograd graph of `t` would accumulate."""
    seen, leaves, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("name, cfg", [
    (CLIP_TEXT, _cfg(image=dict(lock=True))),
    (CLIP_TEXT, _cfg(image=dict(lock=True, unlocked_groups=3), text=dict(lock=True, unlocked_groups=1))),
    (GPT2, _cfg(image=dict(lock=True), text=dict(lock=True))),
    (GPT2, _cfg(lock_patterns=(r"visual\.trunk\.stages\.2\.",), lr_mults=((r"text\.transformer\.wte", 0.0),))),
])
def test_frozen_params_get_no_gradient(name, cfg):
    model = _model(name)
    plan = _applied(model, cfg)
    model.train()
    images, texts = _batch()
    loss = _contrastive_loss(model(images, texts))
    reachable = _graph_params(loss)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in reachable for n in frozen)  # no weight gradient is even computed
    loss.backward()
    assert all(params[n].grad is None for n in frozen)
    assert all(params[n].grad is not None for n in plan.rules_at(0))  # every trainable param learns


def test_locked_trunk_keeps_no_activations():
    def saved_bytes(model, images):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            feats = model.encode_image(images)
        return total[0], feats

    images, _ = _batch()
    model = _model()
    unlocked_bytes, _ = saved_bytes(model, images)
    _applied(model, _cfg(image=dict(lock=True)))
    locked_bytes, feats = saved_bytes(model, images)
    assert locked_bytes < unlocked_bytes / 10  # only the attention-pool head saves activations

    trunk = {id(p) for p in model.visual.trunk.parameters()}
    head = {id(p) for p in model.visual.head.parameters()}
    reachable = _graph_params(feats)
    assert not reachable & trunk
    assert head <= reachable


def test_a_tower_that_declares_its_layer_groups_is_taken_at_its_word():
    model = _model()
    names = [n for n, _ in model.visual.named_parameters()]
    trunk = [n for n in names if n.startswith("trunk.")]
    half = len(trunk) // 2
    model.visual.layer_groups = lambda: [trunk[:half], trunk[half:]]  # instead of timm's group_matcher
    layout = tower_layout(model)["image"]
    assert layout.groups == [[f"visual.{n}" for n in trunk[:half]], [f"visual.{n}" for n in trunk[half:]]]
    assert layout.head == [f"visual.{n}" for n in names if not n.startswith("trunk.")] and layout.head
    plan = build_plan(model, FreezeCfg(image=TowerSchedule(lock=True, unlocked_groups=1)), epochs=1)
    assert {n for n in plan.rules_at(0) if n.startswith("visual.trunk.")} == {f"visual.{n}" for n in trunk[half:]}
