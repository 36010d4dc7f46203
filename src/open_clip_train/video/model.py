"""Any open_clip model as a video-text model: frames [B, T, 3, H, W] -> per-frame `encode_image`
on B*T frames -> `video_pool` -> one normalised video vector.

`attach_video(model, cfg)` adds the pooling module as `model.video_pool` and gives the model the
methods below by switching its class to a subclass of its own (as `text_trim.adopt` does): every
existing parameter keeps its name (`visual.*`, `text.*` / `transformer.*`, `logit_scale`), so image
CLIP checkpoints load unchanged and the only new names start with `video_pool.` (VIDEO_PREFIX),
which freezing plans and lr-mult patterns can address. The video modules are trainable.

While no image-tower parameter requires grad, the frames pass the tower under torch.no_grad (no
activations kept for B*T frames); otherwise `set_grad_checkpointing` applies to that per-frame
pass as to images. Apply `text_trim.adopt` before `attach_video` (it only adopts a plain CLIP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pooling import POOLINGS, PoolOutput, VideoPool

VIDEO_PREFIX = "video_pool."


@dataclass(frozen=True)
class VideoModelCfg:
    pooling: str = "mean"  # one of POOLINGS
    max_frames: int = 12
    temporal_layers: int = 4  # seqtransf blocks (CLIP4Clip's cross_num_hidden_layers)
    init_from_text: bool = True  # seqtransf: copy the text tower's first blocks / positions if widths match

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"video pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.max_frames < 1 or self.temporal_layers < 1:
            raise ValueError(f"need max_frames >= 1 and temporal_layers >= 1, got {self}")


class VideoCLIPMixin:
    """Methods added to an open_clip model by `attach_video`."""

    video_pool: VideoPool

    def image_tower_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual.parameters())

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> raw per-frame image features [B, T, D] (not normalised)."""
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        if self.image_tower_frozen():
            with torch.no_grad():
                feats = self.encode_image(flat)
        else:
            feats = self.encode_image(flat)
        return feats.reshape(b, t, -1)

    def pool_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> PoolOutput:
        if mask is None:
            mask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
        return self.video_pool(self.encode_frames(frames), mask.to(frames.device))

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None,
                     normalize: bool = True) -> torch.Tensor:
        """[B, T, 3, H, W] (+ mask [B, T], True = real frame) -> video features [B, D] (normalised;
        `normalize` is accepted for encode_image symmetry)."""
        return self.pool_video(frames, mask).features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None):
        """5-D `image` = frames: open_clip's output dict with the video features as image_features,
        plus `frame_weights` [B, T] (and `frame_scores` for AFA). 4-D images: the model's own forward.
        A (frames, mask) pair (the trainer's `VideoFrames`) is taken apart here, so callers pass one input;
        it is always video (its frames may be a frozen-feature cache's rows, video/frozen.py)."""
        pair = isinstance(image, tuple)
        if pair:
            image, frame_mask = image
        if not pair and (image is None or image.ndim != 5):
            return super().forward(image, text)
        pooled = self.pool_video(image, frame_mask)
        out = {
            "image_features": pooled.features,
            "text_features": F.normalize(self.encode_text(text), dim=-1) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
            "frame_weights": pooled.weights,
        }
        if getattr(self, "logit_bias", None) is not None:
            out["logit_bias"] = self.logit_bias
        if pooled.scores is not None:
            out["frame_scores"] = pooled.scores
        return out


_CLASSES: dict[type, type] = {}


def _video_class(cls: type) -> type:
    if issubclass(cls, VideoCLIPMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Video{cls.__name__}", (VideoCLIPMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _text_init(model: nn.Module, width: int) -> tuple[nn.ModuleList | None, torch.Tensor | None]:
    """The text tower's residual blocks and positional embeddings, when they fit `width`."""
    from open_clip.transformer import ResidualAttentionBlock

    text = getattr(model, "text", None)
    owner = text if text is not None else model  # CustomTextCLIP keeps its tower in .text, CLIP at the top
    blocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
    positions = getattr(owner, "positional_embedding", None)
    fits = blocks is not None and all(isinstance(b, ResidualAttentionBlock) for b in blocks) \
        and blocks[0].ln_1.normalized_shape[0] == width
    if not fits:
        return None, None
    return blocks, (positions.detach() if positions is not None and positions.shape[-1] == width else None)


def embed_dim(model: nn.Module) -> int:
    """The image features' width, from one blank image in eval mode (no norm statistics change)."""
    size = model.visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    p = next(model.visual.parameters())
    was_training = model.visual.training
    model.visual.eval()
    try:
        with torch.no_grad():
            return model.encode_image(torch.zeros(1, 3, *size, dtype=p.dtype, device=p.device)).shape[-1]
    finally:
        model.visual.train(was_training)


def attach_video(model: nn.Module, cfg: VideoModelCfg) -> nn.Module:
    """Make `model` a video-text model in place (see the module docstring); returns it."""
    if hasattr(model, "video_pool"):
        raise ValueError("model already has a video_pool")
    width = embed_dim(model)
    blocks, positions = _text_init(model, width) if cfg.init_from_text else (None, None)
    p = next(model.parameters())
    pool = VideoPool(cfg.pooling, width, cfg.max_frames, temporal_layers=cfg.temporal_layers,
                     text_blocks=blocks, text_positions=positions).to(device=p.device, dtype=p.dtype)
    model.__class__ = _video_class(type(model))
    model.add_module("video_pool", pool)
    return model


def video_param_names(model: nn.Module) -> list[str]:
    """Names of the video modules' parameters (all under VIDEO_PREFIX)."""
    return [n for n, _ in model.named_parameters() if n.startswith(VIDEO_PREFIX)]
