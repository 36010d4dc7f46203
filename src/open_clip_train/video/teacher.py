"""Frozen video teachers behind one interface, so a feature cache can stand in for the encoders.

A teacher splits into encoders (run once per video / caption; what a cache stores) and a small
similarity head (run per batch: the B x B matrix depends on which samples share the batch):

    feats = teacher.encode(frames, mask, tokens)           # TeacherFeatures (video + text parts)
    logits = teacher.similarity(feats.video, feats.text)    # [B_text, B_video], teacher's scale applied
    relevance = teacher.relevance(feats.video, feats.text)  # [B, T] matched pairs, 0 on padded frames

frames: [B, T, 3, H, W] float, the teacher's own preprocessing; mask: [B, T] bool (True = real
frame); tokens: [B, L] in the teacher's tokenizer. Every feature comes back L2-normalised.

Teachers are frozen, always in eval mode (also after `.train()`), never wrapped in DDP and run
under `torch.no_grad` (not inference_mode: the distillation loss saves their outputs for the
student's backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .distill_loss import masked_softmax


@dataclass
class VideoFeatures:
    """What a teacher's head needs of each video."""
    frames: torch.Tensor  # [B, T, D] normalised per-frame features (padded frames included)
    video: torch.Tensor  # [B, D] normalised pooled / temporally encoded video feature
    mask: torch.Tensor  # [B, T] bool


@dataclass
class TextFeatures:
    """What a teacher's head needs of each caption."""
    sentence: torch.Tensor  # [B, D] normalised
    words: Optional[torch.Tensor] = None  # [B, W, D] normalised per-token features (X-CLIP only)


@dataclass
class TeacherFeatures:
    video: VideoFeatures
    text: TextFeatures


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of [B, T, D] where mask [B, T] is True (an all-padding row gives 0)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def sentence_frame_relevance(video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
    """TeachCLIP's fine target: for matched pair i, softmax over video i's valid frames of the
    cosine between sentence i and each frame (no temperature). [B, T]."""
    if video.frames.shape[0] != text.sentence.shape[0]:
        raise ValueError(f"relevance is for matched pairs: {video.frames.shape[0]} videos but "
                         f"{text.sentence.shape[0]} captions")
    cos = torch.einsum("bd,btd->bt", text.sentence, video.frames)
    return masked_softmax(cos, video.mask.bool())


def cosine_similarity(head: Mapping[str, torch.Tensor], video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
    """exp(logit_scale) x cosine of sentence and video features -> [B_text, B_video]."""
    scale = head["logit_scale"]
    dt = scale.dtype if scale.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.no_grad():
        return scale.to(text.sentence.device, dt).exp() * text.sentence.to(dt) @ video.video.to(dt).T


def head_similarity(kind: str, head: Mapping[str, torch.Tensor], video: VideoFeatures,
                    text: TextFeatures) -> torch.Tensor:
    """A teacher's similarity from its head tensors alone: what a cached teacher runs per batch."""
    if kind == "open_clip":
        return cosine_similarity(head, video, text)
    if kind == "xclip":
        from .xclip import loose_similarity
        return loose_similarity(head, video, text)
    raise ValueError(f"unknown video teacher kind {kind!r}; expected 'open_clip' or 'xclip'")


class VideoTeacher(nn.Module):
    """Base class: freezing, eval-only mode, device/dtype; subclasses give the encoders and head."""

    needs_words = False  # whether similarity() uses TextFeatures.words
    kind = ""  # names the similarity head (head_similarity)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VideoTeacher":
        return super().train(False)  # a teacher never trains: no dropout or BN updates

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def head_dtype(self) -> torch.dtype:
        """Features and heads run in fp32 under a half-precision teacher, else in its dtype."""
        return self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32

    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> VideoFeatures:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        raise NotImplementedError

    def head_state(self) -> Dict[str, torch.Tensor]:
        """The similarity head's tensors (what a feature cache stores beside the features)."""
        raise NotImplementedError

    def similarity(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """[B_text, B_video] logits, the teacher's logit scale applied."""
        return head_similarity(self.kind, self.head_state(), video, text)

    def meta(self) -> Dict[str, Any]:
        """The teacher's provenance for a cache manifest."""
        raise NotImplementedError

    def encode(self, frames: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> TeacherFeatures:
        return TeacherFeatures(self.encode_video(frames, mask), self.encode_text(tokens))

    def relevance(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        with torch.no_grad():
            dt = self.head_dtype
            return sentence_frame_relevance(VideoFeatures(video.frames.to(dt), video.video.to(dt), video.mask),
                                            TextFeatures(text.sentence.to(dt), text.words))

    def _frames_in(self, frames: torch.Tensor, mask: torch.Tensor):
        if frames.ndim != 5 or mask.shape != frames.shape[:2]:
            raise ValueError(f"frames must be [B, T, 3, H, W] with a [B, T] mask, got {tuple(frames.shape)} "
                             f"and {tuple(mask.shape)}")
        if self.training:
            self.eval()  # someone called .train() on an inner module
        return frames.to(self.device, self.dtype), mask.to(self.device).bool()


class OpenClipFrameTeacher(VideoTeacher):
    """Any open_clip model applied per frame: video = normalised masked mean of its normalised
    frame features; similarity = cosine x its logit scale.

    `frame_batch` bounds how many frames go through the image tower at once (memory)."""

    kind = "open_clip"

    def __init__(self, model: nn.Module, *, name: str = "", weights_path: Optional[str] = None,
                 frame_batch: int = 256):
        super().__init__()
        self.model = getattr(model, "module", model)
        self.name, self.weights_path, self.frame_batch = name, weights_path, int(frame_batch)
        self._freeze()

    @classmethod
    def from_pretrained(cls, name: str, pretrained: str, *, device: str | torch.device = "cpu",
                        precision: str = "fp32", **kw) -> "OpenClipFrameTeacher":
        """Build `name` with the project's model registry and load `pretrained` (every weight must load)."""
        from ..distill.teacher import Teacher  # the image teacher's checked loading
        image_teacher = Teacher.from_pretrained(name, pretrained, device=device, precision=precision)
        return cls(image_teacher.model, name=name, weights_path=str(pretrained), **kw)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().to(self.head_dtype).exp()

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> normalised [B, T, D] (every frame, padded ones too)."""
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        out = [self.model.encode_image(chunk, normalize=True) for chunk in flat.split(self.frame_batch)]
        return torch.cat(out).to(self.head_dtype).reshape(b, t, -1)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> VideoFeatures:
        frames, mask = self._frames_in(frames, mask)
        with torch.no_grad():
            feats = self.frame_features(frames)
            return VideoFeatures(feats, F.normalize(masked_mean(feats, mask), dim=-1), mask)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        with torch.no_grad():
            return TextFeatures(self.model.encode_text(tokens.to(self.device), normalize=True).to(self.head_dtype))

    def head_state(self) -> Dict[str, torch.Tensor]:
        return {"logit_scale": self.model.logit_scale.detach().to(self.head_dtype)}

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind, "model": self.name, "weights": self.weights_path,
                "logit_scale": float(self.logit_scale())}
