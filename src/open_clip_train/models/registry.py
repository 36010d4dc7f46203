"""Model factory: open_clip configs plus ours (GPT-2 text towers), offline weight loading, tokenizers.

Every model is created with random init and then filled from local files only; the model hub is
never contacted, so every pretrained source is an explicit path.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import math
from dataclasses import asdict
from typing import Any, Callable, Sequence

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from ..precision import PRECISIONS
from . import text_trim
from .gpt2 import GPT2CLIP, CausalTokenizer
from .weights import LoadReport, gpt2_state_dict, load_into, new_report, read_state_dict

Tokenizer = Callable[[str | Sequence[str]], torch.Tensor]


def list_models() -> list[str]:
    """All model names: open_clip's built-ins plus the configs this package registers with it."""
    return open_clip.list_models()


def close_model_names(name: str, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list_models(), n=n, cutoff=0.5)


def _model_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        hint = close_model_names(name)
        suggestion = f" Did you mean: {', '.join(hint)}?" if hint else ""
        raise ValueError(f"unknown model {name!r}.{suggestion} (list_models() shows all names)")
    return cfg


def is_gpt2_config(cfg: dict[str, Any]) -> bool:
    return "gpt2" in cfg["text_cfg"]


def _apply_precision(model: nn.Module, device: torch.device, precision: str) -> None:
    # Mirrors open_clip for all-timm/HF models: fp16/bf16/pure_* cast everything; amp keeps fp32.
    if precision in ("fp16", "bf16", "pure_fp16", "pure_bf16"):
        model.to(device=device, dtype=torch.float16 if "fp16" in precision else torch.bfloat16)
    else:
        model.to(device=device)


def _build_gpt2_clip(cfg: dict[str, Any], precision: str, device: torch.device,
                     overrides: dict[str, Any] | None = None) -> nn.Module:
    overrides = dict(overrides or {})
    preprocess = overrides.pop("force_preprocess_cfg", None) or {}
    refused = sorted(k for k, v in overrides.items() if v)
    if refused:
        flags = ", ".join("--" + k.replace("_", "-") for k in refused)
        raise ValueError(f"{flags}: not supported for models with a GPT-2 text tower (open_clip does not build "
                         "them); add a model config instead")
    model = GPT2CLIP(**cfg, output_dict=True)
    _apply_precision(model, device, precision)
    pp_cfg = asdict(PreprocessCfg())
    pp_cfg["size"] = model.visual.image_size
    pp_cfg.update(preprocess)
    open_clip.model.set_model_preprocess_cfg(model, pp_cfg)
    return model


class _NoRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' before we load weights ourselves; LoadReport tells the truth."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def loss_model_kwargs(siglip: bool) -> dict[str, Any]:
    """What the loss needs of the model, as upstream's trainer sets it: SigLIP starts from
    logit scale log(10) and a learned logit bias of -10 (CLIP's softmax needs neither)."""
    return {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}


def _build(name: str, cfg: dict[str, Any], precision: str, device: torch.device,
           model_kwargs: dict[str, Any], overrides: dict[str, Any] | None = None) -> nn.Module:
    if is_gpt2_config(cfg):
        return _build_gpt2_clip(cfg, precision, device, overrides)
    root, quiet = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(quiet)
    try:
        # pretrained_image=False keeps open_clip from asking timm to download trunk weights.
        model = open_clip.create_model(
            name, pretrained=None, precision=precision, device=device, output_dict=True, pretrained_image=False,
            **model_kwargs, **(overrides or {}),
        )
    finally:
        root.removeFilter(quiet)
    _init_coca_decoder_projection(model)
    return text_trim.adopt(model)


def _init_coca_decoder_projection(model: nn.Module) -> None:
    """open_clip 3.3's CoCa text decoder (MultimodalTransformer) makes `text_projection` with
    torch.empty and never calls its init_parameters: the weights are whatever memory held (zeros
    from a fresh mapping, or 1e31-sized garbage from a reused one: a non-finite first step).
    Initialise it as that init_parameters means to (which would fail: it reads a `.transformer`
    the decoder does not have); the decoder's blocks keep the init they get today."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, nn.Parameter):
        with torch.no_grad():
            nn.init.normal_(projection, std=decoder.width ** -0.5)


def _load_weights(
        model: nn.Module,
        gpt2: bool,
        pretrained: str | None,
        pretrained_image: bool,
        pretrained_image_path: str | None,
        pretrained_text_path: str | None,
        trust: bool = False,
) -> LoadReport:
    report = new_report(model)
    if pretrained:
        load_into(model, read_state_dict(pretrained, trust), report, pretrained)
    # Tower weights go in after the full checkpoint so they win, as in open_clip.
    if pretrained_image or pretrained_image_path:
        if not pretrained_image_path:
            raise ValueError(
                "pretrained_image=True needs local trunk weights: the model hub is not reachable, "
                "pass --pretrained-image-path (a timm .safetensors file)"
            )
        load_into(model, read_state_dict(pretrained_image_path, trust), report, pretrained_image_path, "visual.trunk.")
    if pretrained_text_path:
        if not gpt2:
            raise ValueError("pretrained_text_path is only supported for GPT-2 text towers, not CLIP text")
        load_into(model, gpt2_state_dict(pretrained_text_path), report, pretrained_text_path, "text.transformer.")
    return report


def create_model(
        name: str,
        *,
        pretrained: str | None = None,
        pretrained_image: bool = False,
        pretrained_image_path: str | None = None,
        pretrained_text_path: str | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        trust_checkpoint: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build `name` (forward returns a dict) and load the given local weights; see LoadReport for results.
    Torch weight files are read weights-only (no arbitrary unpickling) unless trust_checkpoint.

    cache_dir is accepted for CLI symmetry with open_clip; nothing is downloaded, so it is unused.
    model_kwargs override the config's model arguments, as open_clip's (e.g. `loss_model_kwargs`).
    overrides: open_clip.create_model's force_* arguments (`model_overrides.create_model_kwargs`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    cfg = _model_config(name)
    device = torch.device(device)
    if device.type == "meta" and (pretrained or pretrained_image or pretrained_image_path or pretrained_text_path):
        raise ValueError("weights cannot be loaded into a model on the meta device")
    # On 'meta' the model is only a shape skeleton (e.g. for parameter counting), built without memory.
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = _build(name, dict(cfg, **(model_kwargs or {})), precision, device, model_kwargs or {}, overrides)
    report = _load_weights(
        model, is_gpt2_config(cfg), pretrained, pretrained_image, pretrained_image_path, pretrained_text_path,
        trust_checkpoint,
    )
    return model, report


def get_tokenizer(name: str, text_tokenizer: str | None = None, context_length: int | None = None) -> Tokenizer:
    """Tokenizer matching model `name`; GPT-2 towers need a local HF tokenizer directory."""
    cfg = _model_config(name)
    if not is_gpt2_config(cfg):
        return open_clip.get_tokenizer(name, context_length=context_length)
    if not text_tokenizer:
        raise ValueError(
            f"model {name!r} has a GPT-2 text tower: pass --text-tokenizer, a local HF tokenizer "
            "directory (e.g. a GPT-2 byte-level BPE saved with save_pretrained)"
        )
    text_cfg = cfg["text_cfg"]
    tokenizer = CausalTokenizer(
        text_tokenizer,
        context_length=context_length or text_cfg["context_length"],
        model_vocab_size=text_cfg["gpt2"]["vocab_size"],
    )
    expected_eos = text_cfg["gpt2"]["eos_token_id"]
    if tokenizer.eos_token_id != expected_eos:
        raise ValueError(
            f"tokenizer at {text_tokenizer} has eos id {tokenizer.eos_token_id} but model {name!r} pools at "
            f"eos id {expected_eos} (text_cfg.gpt2.eos_token_id); use a tokenizer whose EOS has that id"
        )
    return tokenizer


def get_preprocess(model: nn.Module, is_train: bool, no_augment: bool = False) -> Callable:
    """open_clip's image transform for the model's preprocess_cfg; training augmentation unless disabled."""
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return image_transform_v2(pp_cfg, is_train=is_train and not no_augment)
