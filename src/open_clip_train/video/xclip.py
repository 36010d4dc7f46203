"""X-CLIP (ACM MM 2022) as a frozen video teacher, loaded from a checkpoint of the public code
(`modules/modeling_xclip.py`, loose type).

Checkpoint keys:
    clip.*                                an OpenAI-layout CLIP (built here with open_clip)
    frame_position_embeddings.weight      [P, D]       } sim_header seqTransf only
    transformerClip.resblocks.{i}.*       temporal transformer (LayerNorm eps 1e-12, QuickGELU)
    global_mat_weight, local_mat_weight   [D, D]  eye-initialised, learned
    word_logit_weight, word_mat_weight, word_mat_weight2     [W, W]  (W = max_words)
    frame_logit_weight, frame_mat_weight, frame_mat_weight2  [T, T]  (T = max_frames)

Dims come from the tensors; heads are width // 64 as in OpenAI CLIP and X-CLIP. Frames and
tokens must be padded to exactly T and W (the head multiplies by [T, T] / [W, W]).

The head (`similarity`) follows `_loose_similarity`: the mean of video-sentence, video-word,
sentence-frame and frame-word scores, the last three with attention-over-similarity weights
(softmax at temperature 0.01 then the learned matrices), times CLIP's logit scale. As there,
the frame terms use the raw CLIP frame features, and padded frames and padded word positions
take part in those softmaxes (only the temporal transformer and the mean pooling use the frame
mask): reproducing the trained teacher, not fixing it.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .teacher import TextFeatures, VideoFeatures, VideoTeacher, masked_mean

HEAD_WIDTH = 64
SOFTMAX_TEMPERATURE = 1e-2
_D_MATS = ("global_mat_weight", "local_mat_weight")
_W_MATS = ("word_logit_weight", "word_mat_weight", "word_mat_weight2")
_T_MATS = ("frame_logit_weight", "frame_mat_weight", "frame_mat_weight2")


class TfLayerNorm(nn.Module):
    """X-CLIP's temporal-transformer LayerNorm (TF style, eps 1e-12 inside the square root)."""

    def __init__(self, width: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TemporalBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = TfLayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = TfLayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [T, B, D] (sequence first, as the reference); attn_mask [B, T, T] additive."""
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask.repeat_interleave(self.heads, 0))[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """`transformerClip`: residual attention blocks over the frames of each video."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([TemporalBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def _layers(state: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pat.match(k)] if m})


def _heads(width: int, what: str) -> int:
    if width < HEAD_WIDTH or width % HEAD_WIDTH:
        raise ValueError(f"X-CLIP checkpoint: {what} width {width} is not a multiple of the {HEAD_WIDTH}-wide heads "
                         "of OpenAI CLIP / X-CLIP")
    return width // HEAD_WIDTH


def _need(state: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"X-CLIP checkpoint: missing key {key}")
    return state[key]


def build_clip(clip_state: Mapping[str, torch.Tensor]) -> nn.Module:
    """An open_clip CLIP (QuickGELU, fp32) shaped after OpenAI-layout ViT weights; not loaded."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    if "visual.proj" not in clip_state:
        raise ValueError("X-CLIP checkpoint: clip.visual.proj missing (only ViT CLIP backbones are supported)")
    conv = _need(clip_state, "visual.conv1.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((_need(clip_state, "visual.positional_embedding").shape[0] - 1) ** 0.5)
    vision = CLIPVisionCfg(layers=_layers(clip_state, "visual.transformer.resblocks."), width=width,
                           patch_size=patch, image_size=patch * grid)
    _heads(width, "vision")
    text_width = _need(clip_state, "ln_final.weight").shape[0]
    text = CLIPTextCfg(context_length=_need(clip_state, "positional_embedding").shape[0],
                       vocab_size=_need(clip_state, "token_embedding.weight").shape[0], width=text_width,
                       heads=_heads(text_width, "text"), layers=_layers(clip_state, "transformer.resblocks."))
    embed_dim = _need(clip_state, "text_projection").shape[1]
    return CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def _strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names unknown, missing and mis-shaped keys in one ValueError."""
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = []
    for label, items in (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes", shapes)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}" + (", ..." if len(items) > 5 else ""))
    if problems:
        raise ValueError(f"X-CLIP checkpoint {source} does not fit: {'; '.join(problems)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


class XClipTeacher(VideoTeacher):
    """X-CLIP's encoders and loose similarity head; see the module docstring."""

    needs_words = True
    kind = "xclip"

    def __init__(self, clip: nn.Module, *, max_frames: int, max_words: int, temporal_layers: int,
                 temporal_positions: int, name: str = "xclip", weights_path: Optional[str] = None):
        super().__init__()
        self.clip = clip
        dim = clip.text_projection.shape[1]
        self.max_frames, self.max_words, self.name, self.weights_path = max_frames, max_words, name, weights_path
        self.seq_transf = temporal_layers > 0
        if self.seq_transf:
            self.frame_position_embeddings = nn.Embedding(temporal_positions, dim)
            self.transformerClip = TemporalTransformer(dim, temporal_layers, _heads(dim, "temporal"))
        for n in _D_MATS:
            self.register_parameter(n, nn.Parameter(torch.eye(dim)))
        for n in _W_MATS:
            self.register_parameter(n, nn.Parameter(torch.eye(max_words)))
        for n in _T_MATS:
            self.register_parameter(n, nn.Parameter(torch.eye(max_frames)))
        self._freeze()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                        weights_path: Optional[str] = None) -> "XClipTeacher":
        state = dict(state)
        if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
            state = {k[len("module."):]: v for k, v in state.items()}
        clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        if not clip_state:
            raise ValueError(f"X-CLIP checkpoint {source}: no clip.* weights (is it an X-CLIP checkpoint?)")
        for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI metadata entries
            clip_state.pop(k, None)
            state.pop("clip." + k, None)
        clip = build_clip(clip_state)
        layers = _layers(state, "transformerClip.resblocks.")
        positions = state["frame_position_embeddings.weight"].shape[0] \
            if "frame_position_embeddings.weight" in state else 0
        if (layers > 0) != (positions > 0):
            raise ValueError(f"X-CLIP checkpoint {source}: "
                             + ("missing key frame_position_embeddings.weight" if layers
                                else "missing keys transformerClip.resblocks.* (seqTransf)"))
        teacher = cls(clip, max_frames=_need(state, "frame_logit_weight").shape[0],
                      max_words=_need(state, "word_logit_weight").shape[0], temporal_layers=layers,
                      temporal_positions=positions, weights_path=weights_path)
        _strict_load(teacher, state, source)
        teacher._freeze()
        return teacher

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "XClipTeacher":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"X-CLIP checkpoint {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        return cls.from_state_dict(state, source=str(path), weights_path=str(path)).to(device)

    # ------------------------------------------------------------------ encoders
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().to(self.head_dtype).exp()

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> VideoFeatures:
        frames, mask = self._frames_in(frames, mask)
        b, t = mask.shape
        if t != self.max_frames:
            raise ValueError(f"X-CLIP teacher takes exactly max_frames={self.max_frames} frames per video "
                             f"(pad with mask False), got {t}")
        with torch.no_grad():
            raw = self.clip.encode_image(frames.reshape(b * t, *frames.shape[2:])).to(self.head_dtype).reshape(b, t, -1)
            x = raw
            if self.seq_transf:
                x = raw + self.frame_position_embeddings.weight[:t].to(raw.dtype)
                additive = (1.0 - mask.to(raw.dtype)).unsqueeze(1).expand(-1, t, -1) * -1000000.0
                x = self.transformerClip(x.transpose(0, 1), additive).transpose(0, 1) + raw
            video = F.normalize(masked_mean(F.normalize(x, dim=-1), mask), dim=-1)
            return VideoFeatures(F.normalize(raw, dim=-1), video, mask)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        """tokens [B, W] (CLIP BPE, EOT the highest id, zero padding) -> sentence (the EOT
        position) and every position's projected feature."""
        if tokens.shape[-1] != self.max_words:
            raise ValueError(f"X-CLIP teacher takes exactly max_words={self.max_words} tokens, got {tokens.shape[-1]}")
        clip, n = self.clip, tokens.shape[-1]
        tokens = tokens.to(self.device)
        with torch.no_grad():
            x = clip.token_embedding(tokens) + clip.positional_embedding[:n]
            # the causal mask makes the first n positions independent of any later padding
            x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
            hidden = (clip.ln_final(x) @ clip.text_projection).to(self.head_dtype)
            sentence = hidden[torch.arange(hidden.shape[0], device=hidden.device), tokens.argmax(dim=-1)]
            return TextFeatures(F.normalize(sentence, dim=-1), F.normalize(hidden, dim=-1))

    # ------------------------------------------------------------------ head
    def head_state(self) -> Dict[str, torch.Tensor]:
        state = {n: getattr(self, n).detach() for n in _D_MATS + _W_MATS + _T_MATS}
        state["logit_scale"] = self.clip.logit_scale.detach()
        return state

    def meta(self) -> Dict[str, Any]:
        return {"kind": self.kind, "model": self.name, "weights": self.weights_path,
                "logit_scale": float(self.logit_scale()), "max_frames": self.max_frames, "max_words": self.max_words}


def loose_similarity(head: Mapping[str, torch.Tensor], video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
    """X-CLIP's `_loose_similarity` on normalised features -> [B_text, B_video] logits.

    head: the eight matrices and `logit_scale` (log value), as XClipTeacher.head_state()."""
    if text.words is None:
        raise ValueError("X-CLIP's similarity needs the captions' word features (cache built without words?)")
    dt = head["global_mat_weight"].dtype
    dt = dt if dt in (torch.float32, torch.float64) else torch.float32
    h = {k: v.to(text.sentence.device, dt) for k, v in head.items()}
    sent, words = text.sentence.to(dt), text.words.to(dt)
    video_feat, frames = video.video.to(dt), video.frames.to(dt)
    tau = SOFTMAX_TEMPERATURE
    with torch.no_grad():
        video_sentence = sent @ h["global_mat_weight"] @ video_feat.T
        # video-word: attention over the words of each caption, per video
        wv = torch.einsum("twd,vd->tvw", words, video_feat)
        video_word = ((wv / tau).softmax(-1) @ h["word_logit_weight"] * wv).sum(-1)
        # sentence-frame: attention over the frames of each video, per caption
        sf = torch.einsum("td,vfd->tvf", sent, frames)
        sentence_frame = ((sf / tau).softmax(-1) @ h["frame_logit_weight"] * sf).sum(-1)
        frame_word = _frame_word(h, words, frames)
        return h["logit_scale"].exp() * (video_sentence + video_word + sentence_frame + frame_word) / 4


def _frame_word(h: Mapping[str, torch.Tensor], words: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """X-CLIP's attention over the fine-grained word-frame similarity [Bt, Bv, W, T]."""
    tau = SOFTMAX_TEMPERATURE
    s = torch.einsum("twd,de,vfe->tvwf", words, h["local_mat_weight"], frames)
    over_words = (s / tau).softmax(2).transpose(2, 3) @ h["word_mat_weight"]  # [Bt, Bv, T, W]
    word_level = (over_words.transpose(2, 3) * s).sum(2)  # [Bt, Bv, T]
    frame_level = ((s / tau).softmax(3) @ h["frame_mat_weight"] * s).sum(3)  # [Bt, Bv, W]
    sent2frame = ((word_level / tau).softmax(-1) @ h["frame_mat_weight2"] * word_level).sum(-1)
    video2word = ((frame_level / tau).softmax(-1) @ h["word_mat_weight2"] * frame_level).sum(-1)
    return (sent2frame + video2word) / 2
