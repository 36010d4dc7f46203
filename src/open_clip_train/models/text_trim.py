"""Causal text towers run on the batch's token prefix that reaches the pooled token.

Captions are padded to the context length (77 for CLIP text) while COCO captions are ~10-20
tokens. In a causal tower pooled at the EOS token, the pooled position attends only to positions
at or before it, and nothing after the batch's last pooled position feeds any output: running the
tower on that prefix gives the same features and the same gradients (up to float summation
order) for a fraction of the text tower's cost. The prefix is rounded up to a multiple of
`ROUND` so compiled models see few distinct shapes. `--no-trim-text-padding` runs the full length.

Applies to open_clip's CLIP text (causal mask, argmax/eos pooling) and to our GPT-2 tower.
Bidirectional towers (HF BERT-likes) and other pool types always run the full length.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.model import CLIP
from open_clip.transformer import text_global_pool

ROUND = 8


def prefix_length(pool_index: torch.Tensor, full: int) -> int:
    """Tokens to keep so every row still reaches its pooled position (rounded up to ROUND)."""
    n = int(pool_index.max()) + 1
    return min(full, -(-n // ROUND) * ROUND)


class TrimmedTextCLIP(CLIP):
    """open_clip's CLIP whose encode_text skips the padding after the batch's last pooled token.

    Same parameters, buffers and state-dict keys as CLIP; only encode_text differs.
    """

    trim_text_padding: bool = True

    def _pool_index(self, text: torch.Tensor) -> Optional[torch.Tensor]:
        if self.text_pool_type == "argmax":
            return text.argmax(dim=-1)
        eos = getattr(self, "text_eos_id", None)
        if self.text_pool_type == "eos" and eos is not None:
            is_eos = text == eos
            # open_clip pools a row without EOS at position 0; keep the full length for such batches
            return is_eos.int().argmax(dim=-1) if bool(is_eos.any(dim=1).all()) else None
        return None

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # a causal mask is what makes the positions after the pooled token irrelevant
        index = self._pool_index(text) if self.trim_text_padding and self.attn_mask is not None else None
        n = prefix_length(index, text.shape[1]) if index is not None else text.shape[1]
        if n >= text.shape[1]:
            return super().encode_text(text, normalize)
        text = text[:, :n]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding[:n].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def adopt(model: nn.Module) -> nn.Module:
    """Give an open_clip CLIP (built by open_clip.create_model) the trimming encode_text.

    The object, its state dict and its checkpoints are unchanged: TrimmedTextCLIP adds no state,
    so switching the class is the least invasive way to override one method of a built model.
    """
    if type(model) is CLIP:
        model.__class__ = TrimmedTextCLIP
    return model


def _trimming_modules(model: nn.Module) -> list[nn.Module]:
    """The model and/or its `.text` tower, where their class knows `trim_text_padding`."""
    return [m for m in (model, getattr(model, "text", None)) if m is not None and hasattr(type(m), "trim_text_padding")]


def set_text_padding_trim(model: nn.Module, enabled: bool) -> bool:
    """Turn trimming on or off for `model`; returns whether its text tower supports it."""
    modules = _trimming_modules(model)
    for m in modules:
        m.trim_text_padding = enabled
    return bool(modules)


def text_padding_trim(model: nn.Module) -> bool:
    """Whether `model` trims its text padding (False where its tower does not support it)."""
    return any(m.trim_text_padding for m in _trimming_modules(model))
