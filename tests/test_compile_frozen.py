"""--compile-frozen: a fully frozen image trunk runs compiled without autograd, with the same
outputs and parameter names; any unlock restores the plain forward."""
import torch

from open_clip_train.freeze import FreezeCfg, TowerSchedule, apply_trainable, build_plan
from open_clip_train.frozen_compile import compile_frozen_trunk
from open_clip_train.models import create_model


def test_compiled_frozen_trunk_matches_eager_and_is_undone_at_unlock():
    torch.manual_seed(0)
    model, _ = create_model("tiny-convnext-cliptext")
    plan = build_plan(model, FreezeCfg(image=TowerSchedule(lock=True, unfreeze_at_epoch=1)), epochs=2)
    apply_trainable(model, list(plan.rules_at(0)))
    model.eval()
    images = torch.randn(4, 3, 64, 64)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        eager = model.encode_image(images)

    assert compile_frozen_trunk(model, enable=True)
    out = model.encode_image(images)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    # the trainable head still gets gradients; the trunk is outside autograd
    out.sum().backward()
    assert model.visual.head.pool.qkv.weight.grad is not None
    assert all(p.grad is None for p in model.visual.trunk.parameters())

    apply_trainable(model, list(plan.rules_at(1)))  # the unlock
    assert not compile_frozen_trunk(model, enable=True)
    assert "forward" not in model.visual.trunk.__dict__
    model.zero_grad()
    model.encode_image(images).sum().backward()
    assert model.visual.trunk.stem[0].weight.grad is not None
