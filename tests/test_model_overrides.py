"""--force-*, --image-* and --aug-cfg: the same model and transforms as upstream's
create_model_and_transforms call, and one-line errors for what open_clip would reject or ignore."""
import re

import pytest
import torch

import open_clip
import open_clip_train.models  # noqa: F401  registers the tiny configs
from open_clip_train.model_overrides import (ModelOverrides, check_for_model, create_model_kwargs,
                                             tokenizer_context_length, transforms, upstream_kwargs, validate)

MODEL = "tiny-convnext-cliptext"

CASES = {
    "none": ModelOverrides(),
    "preprocess": ModelOverrides(image_mean=(0.5, 0.4, 0.3), image_std=(0.2,), image_interpolation="bilinear",
                                 image_resize_mode="squash", aug_cfg={"scale": (0.5, 0.7)}),
    "model": ModelOverrides(force_quick_gelu=True, force_custom_text=True, force_image_size=(48,),
                            force_context_length=20),
    "rect+timm": ModelOverrides(force_image_size=(48, 64), image_resize_mode="longest",
                                aug_cfg={"use_timm": True, "scale": (0.4, 1.0), "ratio": (0.5, 2.0), "re_prob": 0.3,
                                         "re_count": 2, "color_jitter": 0.2}),
    "jitter+gray": ModelOverrides(aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8,
                                           "gray_scale_prob": 0.2}),
}


def _r(transform) -> str:
    """repr without object addresses (open_clip's jitter/gray transforms have no __repr__)."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(transform))


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip warns though it uses them
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_model_and_transforms_as_upstreams_call(case):
    o = CASES[case]
    validate(o)
    torch.manual_seed(0)
    ref, ref_train, ref_val = open_clip.create_model_and_transforms(MODEL, **upstream_kwargs(o))
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, **create_model_kwargs(o))
    train, val = transforms(model, o)
    assert type(model) is type(ref)
    assert _shapes(model) == _shapes(ref)
    assert model.visual.preprocess_cfg == ref.visual.preprocess_cfg
    assert _r(train) == _r(ref_train) and _r(val) == _r(ref_val)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_the_overrides_take_effect():
    base = open_clip.create_model(MODEL)
    m = open_clip.create_model(MODEL, **create_model_kwargs(CASES["model"]))
    assert type(base).__name__ == "CLIP" and type(m).__name__ == "CustomTextCLIP"
    assert m.text.context_length == 20 != base.context_length
    assert m.visual.preprocess_cfg["size"] in (48, (48, 48)) and base.visual.preprocess_cfg["size"] != 48
    assert isinstance(m.text.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    p = open_clip.create_model(MODEL, **create_model_kwargs(CASES["preprocess"]))
    assert p.visual.preprocess_cfg["mean"] == (0.5, 0.4, 0.3) and p.visual.preprocess_cfg["std"] == (0.2,)
    train, val = transforms(p, CASES["preprocess"])
    assert "scale=(0.5, 0.7)" in repr(train) and "bilinear" in repr(val)
    timm_train, _ = transforms(open_clip.create_model(MODEL), CASES["rect+timm"])
    assert "RandomErasing" in repr(timm_train)
    assert tokenizer_context_length(CASES["model"]) == 20
    assert open_clip.get_tokenizer(MODEL, context_length=20)(["a cat"]).shape == (1, 20)


def test_no_augment_skips_aug_cfg():
    o = CASES["preprocess"]
    train, val = transforms(open_clip.create_model(MODEL, **create_model_kwargs(o)), o, augment=False)
    assert _r(train) == _r(val)


@pytest.mark.parametrize("overrides,message", [
    (dict(aug_cfg={"scal": (0.5, 1.0)}), "unknown key(s) scal; allowed: scale, ratio, color_jitter, re_prob, "
                                         "re_count, use_timm, color_jitter_prob, gray_scale_prob"),
    (dict(aug_cfg={"scale": (1.0, 0.5)}), "scale=(1.0, 0.5): must be two numbers 0 < min <= max"),
    (dict(aug_cfg={"scale": "0.5"}), "scale='0.5': must be two numbers"),
    (dict(aug_cfg={"use_timm": "true"}), "use_timm='true': must be True or False"),
    (dict(aug_cfg={"re_prob": 0.3}), "re_prob: only used with use_timm=True"),
    (dict(aug_cfg={"ratio": (0.5, 2.0)}), "ratio: only used with use_timm=True"),
    (dict(aug_cfg={"use_timm": True, "re_count": 0}), "re_count=0: must be an integer >= 1"),
    (dict(aug_cfg={"use_timm": True, "gray_scale_prob": 0.2}), "gray_scale_prob: not used with use_timm=True"),
    (dict(aug_cfg={"color_jitter": 0.4}), "without use_timm it needs 4 values and color_jitter_prob"),
    (dict(aug_cfg={"color_jitter_prob": 0.5}), "color_jitter_prob: needs color_jitter"),
    (dict(aug_cfg={"gray_scale_prob": 1.5}), "gray_scale_prob=1.5: must be a probability"),
    (dict(force_image_size=(0,)), "--force-image-size 0: one size or height width"),
    (dict(force_image_size=(32, 32, 32)), "--force-image-size 32 32 32"),
    (dict(force_patch_dropout=1.0), "--force-patch-dropout 1.0: must be in [0, 1)"),
    (dict(force_context_length=0), "--force-context-length 0: must be >= 1"),
    (dict(image_mean=(0.5, 0.5)), "--image-mean: give 1 value (all channels) or 3 (R G B), got 2"),
    (dict(image_std=(0.5, 0.0, 0.5)), "--image-std: values must be > 0"),
    (dict(image_interpolation="nearest"), "--image-interpolation 'nearest': use one of bicubic, bilinear, random"),
    (dict(image_resize_mode="crop"), "--image-resize-mode 'crop': use one of shortest, longest, squash"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as e:
        validate(ModelOverrides(**overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_any_and_image_size():
    assert not ModelOverrides().any and ModelOverrides(force_quick_gelu=True).any
    assert ModelOverrides(force_image_size=(64,)).image_size == 64
    assert ModelOverrides(force_image_size=[48, 64]).image_size == (48, 64)


TINY_VIT = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_patch_dropout_reaches_a_vit_and_is_refused_where_it_cannot(monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-tiny-vit", TINY_VIT)
    o = ModelOverrides(force_patch_dropout=0.25)
    check_for_model(o, TINY_VIT)
    ref, _, _ = open_clip.create_model_and_transforms("test-tiny-vit", **upstream_kwargs(o))
    model = open_clip.create_model("test-tiny-vit", **create_model_kwargs(o))
    assert model.visual.patch_dropout.prob == ref.visual.patch_dropout.prob == 0.25
    with pytest.raises(ValueError, match="test_convnext \\(timm\\) has no patch dropout"):
        check_for_model(o, open_clip.get_model_config(MODEL))
    with pytest.raises(ValueError, match="ResNet image tower has no patch dropout"):
        check_for_model(o, open_clip.get_model_config("RN50"))
    with pytest.raises(ValueError, match="--force-quick-gelu: the model's GPT-2 text tower"):
        check_for_model(ModelOverrides(force_quick_gelu=True), open_clip.get_model_config("tiny-convnext-gpt2"))
    check_for_model(ModelOverrides(force_quick_gelu=True, force_custom_text=True), open_clip.get_model_config(MODEL))
