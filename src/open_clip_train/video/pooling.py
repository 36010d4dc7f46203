"""Frame features [B, T, D] + frame mask [B, T] -> one normalised video vector [B, D].

* `mean`: masked mean of the normalised frame features, normalised (CLIP4Clip meanP).
* `seqtransf`: CLIP4Clip's temporal transformer: learned frame position embeddings added, residual
  attention blocks over the frames (padded frames masked as keys), a residual back to the input;
  then `mean`. Initialised as CLIP4Clip does: the blocks are copies of the text tower's first
  blocks and the position embeddings its first positional embeddings, when the text width equals
  the embedding width (blocks beyond the text tower's depth, or all when the widths differ, are
  fresh open_clip blocks; position embeddings then start at zero).
* `afa`: TeachCLIP's attentional frame-feature aggregation: fc1 (D->D), ReLU, fc2 (D->1) score each
  frame; weights = softmax(score / 0.1) over the real frames; video = weighted sum of the
  normalised frame features, normalised. TeachCLIP scores padded frames too; here they get weight 0.
* `seqtransf-afa`: the temporal transformer, then AFA (TeachCLIP's student).

All return a `PoolOutput`; `weights` are each frame's share of the video vector (0 for padding).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("mean", "seqtransf", "afa", "seqtransf-afa")
AFA_TEMPERATURE = 0.1


@dataclass
class PoolOutput:
    features: torch.Tensor  # [B, D] normalised
    weights: torch.Tensor  # [B, T] pooling weights, 0 on padded frames
    scores: torch.Tensor | None = None  # [B, T] AFA's raw frame scores (before temperature / softmax)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(scores / temperature) over the True entries of mask (last dim); 0 elsewhere."""
    logits = (scores / temperature).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def masked_mean_weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = mask.to(dtype)
    return m / m.sum(dim=-1, keepdim=True)


def weighted_pool(frame_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """normalise(sum_t w_t * normalise(x_t)); padded frames (w = 0) cannot leak even if non-finite."""
    x = F.normalize(frame_features, dim=-1)
    x = torch.where(weights.unsqueeze(-1) > 0, x, torch.zeros_like(x))
    return F.normalize((weights.unsqueeze(-1) * x).sum(dim=1), dim=-1)


class TemporalTransformer(nn.Module):
    """x + blocks(x + position_embeddings) with padded frames masked out as attention keys."""

    def __init__(self, width: int, max_frames: int, layers: int = 4, heads: int | None = None,
                 text_blocks: nn.ModuleList | None = None, text_positions: torch.Tensor | None = None) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock

        self.position_embeddings = nn.Parameter(torch.zeros(max_frames, width))
        heads = heads or max(1, width // 64)
        copied = min(layers, len(text_blocks)) if text_blocks is not None else 0
        self.blocks = nn.ModuleList(
            copy.deepcopy(text_blocks[i]) if i < copied else ResidualAttentionBlock(width, heads)
            for i in range(layers))
        self.init_from = f"{copied} text blocks + {layers - copied} new"
        if text_positions is not None and text_positions.shape[0] >= max_frames and not text_positions.is_meta:
            with torch.no_grad():
                self.position_embeddings.copy_(text_positions[:max_frames])
        for p in self.parameters():  # the text tower may be frozen; these copies are new modules
            p.requires_grad_(True)
        self.heads = [b.attn.num_heads for b in self.blocks]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = x + self.position_embeddings[:t].to(x.dtype)
        keys = torch.zeros(b, 1, t, dtype=x.dtype, device=x.device).masked_fill(~mask[:, None, :], float("-inf"))
        for block, heads in zip(self.blocks, self.heads):
            attn_mask = keys.expand(b, t, t).repeat_interleave(heads, dim=0)  # [B * heads, T, T]
            h = block(h, attn_mask=attn_mask)
        return h + x


class AfaHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1)


class VideoPool(nn.Module):
    """One of POOLINGS (see the module docstring): optional temporal transformer, then mean or AFA."""

    def __init__(self, kind: str, width: int, max_frames: int, *, temporal_layers: int = 4,
                 text_blocks: nn.ModuleList | None = None, text_positions: torch.Tensor | None = None,
                 afa_temperature: float = AFA_TEMPERATURE) -> None:
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"video pooling must be one of {POOLINGS}, got {kind!r}")
        self.kind, self.afa_temperature = kind, afa_temperature
        self.temporal = TemporalTransformer(width, max_frames, temporal_layers, text_blocks=text_blocks,
                                            text_positions=text_positions) if kind.startswith("seqtransf") else None
        self.afa = AfaHead(width) if kind.endswith("afa") else None

    def forward(self, frame_features: torch.Tensor, mask: torch.Tensor) -> PoolOutput:
        if frame_features.ndim != 3 or mask.shape != frame_features.shape[:2]:
            raise ValueError(f"need frame features [B, T, D] and mask [B, T], got {tuple(frame_features.shape)} "
                             f"and {tuple(mask.shape)}")
        # Every row of `mask` has a real frame: the data makes masks with `pad_frames`, which
        # refuses a video without one. Not checked here: reading the device mask would make the
        # host wait in every forward; a row without one gives NaN features (the trainer stops).
        mask = mask.bool()
        x = self.temporal(frame_features, mask) if self.temporal is not None else frame_features
        if self.afa is None:
            weights = masked_mean_weights(mask, x.dtype)
            return PoolOutput(weighted_pool(x, weights), weights)
        scores = self.afa(x)
        weights = masked_softmax(scores, mask, self.afa_temperature)
        return PoolOutput(weighted_pool(x, weights), weights, scores)
