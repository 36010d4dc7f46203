"""Upstream's model and preprocessing overrides, mapped onto open_clip as upstream's main.py does.

    --force-quick-gelu  --force-custom-text  --force-patch-dropout P  --force-image-size S [S]
    --force-context-length N  --image-mean M [M M]  --image-std S [S S]
    --image-interpolation bicubic|bilinear|random  --image-resize-mode shortest|longest|squash
    --aug-cfg KEY=VALUE ...   (open_clip's AugmentationCfg: scale, ratio, color_jitter, re_prob,
                               re_count, use_timm, color_jitter_prob, gray_scale_prob)

Upstream passes them all to `open_clip.create_model_and_transforms`; that function turns the
image_* values into `force_preprocess_cfg` for `create_model` and hands `aug_cfg` to the training
transform only. `create_model_kwargs` and `transforms` split the same mapping for a trainer that
calls `open_clip.create_model` itself; `upstream_kwargs` is upstream's call, for comparison.

`validate` refuses (ValueError, one line) what open_clip would reject late or silently ignore:
unknown augmentation keys (the message lists the allowed ones), keys the chosen path does not use
(upstream warns "Unused augmentation cfg items" and trains without them: `ratio`, `re_prob`,
`re_count` need `use_timm=True`; `color_jitter_prob` / `gray_scale_prob` only work without it;
`color_jitter` without timm needs `color_jitter_prob` and 4 values), and malformed values.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

INTERPOLATIONS = ("bicubic", "bilinear", "random")
RESIZE_MODES = ("shortest", "longest", "squash")
TIMM_ONLY = ("ratio", "re_prob", "re_count")
OPEN_CLIP_ONLY = ("color_jitter_prob", "gray_scale_prob")


def aug_keys() -> Tuple[str, ...]:
    from open_clip.transform import AugmentationCfg

    return tuple(f.name for f in fields(AugmentationCfg))


@dataclass(frozen=True)
class ModelOverrides:
    force_quick_gelu: bool = False
    force_custom_text: bool = False
    force_patch_dropout: Optional[float] = None
    force_image_size: Optional[Tuple[int, ...]] = None  # one value (square) or (height, width)
    force_context_length: Optional[int] = None
    image_mean: Optional[Tuple[float, ...]] = None
    image_std: Optional[Tuple[float, ...]] = None
    image_interpolation: Optional[str] = None
    image_resize_mode: Optional[str] = None
    aug_cfg: Mapping[str, Any] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self != ModelOverrides()

    @property
    def image_size(self):
        """As upstream: one value becomes an int (square), two stay a (height, width) pair."""
        if self.force_image_size is None:
            return None
        size = tuple(self.force_image_size)
        return size[0] if len(size) == 1 else size


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _pair(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1]


def _prob(v) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _check_aug(aug: Mapping[str, Any]) -> None:
    allowed = aug_keys()
    unknown = sorted(set(aug) - set(allowed))
    if unknown:
        raise ValueError(f"--aug-cfg: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    use_timm = aug.get("use_timm", False)
    if not isinstance(use_timm, bool):
        raise ValueError(f"--aug-cfg use_timm={use_timm!r}: must be True or False")
    checks = {
        "scale": (_pair, "two numbers 0 < min <= max, e.g. scale=(0.9,1.0)"),
        "ratio": (_pair, "two numbers 0 < min <= max, e.g. ratio=(0.75,1.333)"),
        "re_prob": (_prob, "a probability in [0, 1]"),
        "re_count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
        "color_jitter_prob": (_prob, "a probability in [0, 1]"),
        "gray_scale_prob": (_prob, "a probability in [0, 1]"),
        "color_jitter": (lambda v: (_is_number(v) and v >= 0) or (isinstance(v, (tuple, list)) and len(v) in (3, 4)
                                                                   and all(_is_number(x) and x >= 0 for x in v)),
                         "a number or 3-4 numbers >= 0 (brightness, contrast, saturation[, hue])"),
    }
    for key, value in aug.items():
        if key in checks and value is not None and not checks[key][0](value):
            raise ValueError(f"--aug-cfg {key}={value!r}: must be {checks[key][1]}")
    set_keys = {k for k, v in aug.items() if v is not None}
    if use_timm:
        unused = sorted(set_keys & set(OPEN_CLIP_ONLY))
        if unused:
            raise ValueError(f"--aug-cfg {', '.join(unused)}: not used with use_timm=True (open_clip drops them); "
                             "remove them or use_timm")
        return
    unused = sorted(set_keys & set(TIMM_ONLY))
    if unused:
        raise ValueError(f"--aug-cfg {', '.join(unused)}: only used with use_timm=True (open_clip would warn and "
                         "train without them); add use_timm=True or remove them")
    if "color_jitter" in set_keys:
        cj = aug["color_jitter"]
        if not aug.get("color_jitter_prob") or not (isinstance(cj, (tuple, list)) and len(cj) == 4):
            raise ValueError("--aug-cfg color_jitter: without use_timm it needs 4 values and color_jitter_prob > 0, "
                             "e.g. color_jitter=(0.4,0.4,0.4,0.1) color_jitter_prob=0.8")
    elif aug.get("color_jitter_prob"):
        raise ValueError("--aug-cfg color_jitter_prob: needs color_jitter=(b,c,s,h) (4 values)")


def validate(o: ModelOverrides) -> None:
    """ValueError (one line) for any value open_clip would reject or ignore."""
    if o.force_image_size is not None:
        size = tuple(o.force_image_size)
        if len(size) not in (1, 2) or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"--force-image-size {' '.join(map(str, size))}: one size or height width, "
                             "positive integers")
    if o.force_patch_dropout is not None and not 0 <= o.force_patch_dropout < 1:
        raise ValueError(f"--force-patch-dropout {o.force_patch_dropout}: must be in [0, 1)")
    if o.force_context_length is not None and o.force_context_length < 1:
        raise ValueError(f"--force-context-length {o.force_context_length}: must be >= 1")
    for flag, values, positive in (("--image-mean", o.image_mean, False), ("--image-std", o.image_std, True)):
        if values is not None:
            if len(values) not in (1, 3):
                raise ValueError(f"{flag}: give 1 value (all channels) or 3 (R G B), got {len(values)}")
            if positive and min(values) <= 0:
                raise ValueError(f"{flag}: values must be > 0")
    if o.image_interpolation is not None and o.image_interpolation not in INTERPOLATIONS:
        raise ValueError(f"--image-interpolation {o.image_interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
    if o.image_resize_mode is not None and o.image_resize_mode not in RESIZE_MODES:
        raise ValueError(f"--image-resize-mode {o.image_resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
    _check_aug(o.aug_cfg)


def check_for_model(o: ModelOverrides, model_cfg: Mapping[str, Any]) -> None:
    """ValueError for overrides the model's towers cannot take (`model_cfg`: its open_clip config).
    Upstream crashes in timm on --force-patch-dropout for a ConvNeXt trunk and silently ignores
    it for a ResNet; our GPT-2 text towers are not built by open_clip, so --force-quick-gelu and
    --force-custom-text would not reach them."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "gpt2" in text:
        for flag, value in (("--force-quick-gelu", o.force_quick_gelu), ("--force-custom-text", o.force_custom_text)):
            if value:
                raise ValueError(f"{flag}: the model's GPT-2 text tower has its own activations and is always a "
                                 "separate tower; drop the flag")
    if o.force_patch_dropout is None:
        return
    timm_name = vision.get("timm_model_name")
    if timm_name:
        import timm
        import torch

        try:
            with torch.device("meta"):
                timm.create_model(timm_name, pretrained=False, num_classes=0, patch_drop_rate=o.force_patch_dropout)
        except TypeError:
            raise ValueError(f"--force-patch-dropout: the image trunk {timm_name} (timm) has no patch dropout; "
                             "it applies to ViT towers") from None
    elif isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("--force-patch-dropout: the ResNet image tower has no patch dropout (open_clip would "
                         "ignore it); it applies to ViT towers")


def preprocess_overrides(o: ModelOverrides) -> Dict[str, Any]:
    """The image_* values as open_clip's `force_preprocess_cfg` (set ones only)."""
    values = {"mean": o.image_mean, "std": o.image_std, "interpolation": o.image_interpolation,
              "resize_mode": o.image_resize_mode}
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items() if v is not None}


def create_model_kwargs(o: ModelOverrides) -> Dict[str, Any]:
    """Keyword arguments for `open_clip.create_model`, as create_model_and_transforms passes them."""
    return {
        "force_quick_gelu": o.force_quick_gelu,
        "force_custom_text": o.force_custom_text,
        "force_patch_dropout": o.force_patch_dropout,
        "force_image_size": o.image_size,
        "force_context_length": o.force_context_length,
        "force_preprocess_cfg": preprocess_overrides(o),
    }


def upstream_kwargs(o: ModelOverrides) -> Dict[str, Any]:
    """Upstream main.py's keyword arguments to `open_clip.create_model_and_transforms`."""
    return {
        "force_quick_gelu": o.force_quick_gelu,
        "force_custom_text": o.force_custom_text,
        "force_patch_dropout": o.force_patch_dropout,
        "force_image_size": o.image_size,
        "force_context_length": o.force_context_length,
        "image_mean": o.image_mean,
        "image_std": o.image_std,
        "image_interpolation": o.image_interpolation,
        "image_resize_mode": o.image_resize_mode,
        "aug_cfg": dict(o.aug_cfg),
    }


def augmentation_cfg(o: ModelOverrides):
    from open_clip.transform import AugmentationCfg

    return AugmentationCfg(**dict(o.aug_cfg))


def transforms(model, o: ModelOverrides, augment: bool = True) -> Tuple[Callable, Callable]:
    """(train, val) transforms from the model's preprocess_cfg (which create_model_kwargs' image_*
    overrides already set), with --aug-cfg on the training one, as create_model_and_transforms."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    train = image_transform_v2(pp, is_train=augment, aug_cfg=augmentation_cfg(o) if augment else None)
    return train, image_transform_v2(pp, is_train=False)


def tokenizer_context_length(o: ModelOverrides) -> Optional[int]:
    """Upstream: get_tokenizer(model, context_length=args.force_context_length)."""
    return o.force_context_length
