"""Causal text towers run on the batch's token prefix that reaches the pooled token.

Captions are padded to the context length (77 for CLIP text) while COCO captions are ~10-20
tokens. In a causal tower pooled at the EOS token, the pooled position attends only to positions
at or before it, and nothing after the batch's last pooled position feeds any output: running the
tower on that prefix gives the same features and the same gradients (up to float summation
order) for a fraction of the text tower's cost. The prefix is rounded up to a multiple of
`ROUND` so compiled models see few distinct shapes. `--no-trim-text-padding` runs the full length.

Finding the prefix reads the pooled positions. On a GPU, reading them from the device tokens in
the forward would make the host wait for the image tower queued before it, so the trainer finds
the prefix on the batch's host copy (`host_prefix_length`), hands the tower the trimmed tokens,
and inside `caller_trims(model)` the tower runs the tokens it is given as they are, without a read.

Applies to open_clip's CLIP text (causal mask, argmax/eos pooling) and to our GPT-2 tower.
Bidirectional towers (HF BERT-likes) and other pool types always run the full length.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

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
    caller_trimmed: bool = False  # set inside `caller_trims`: the tokens come trimmed already

    def trim_pool_index(self, text: torch.Tensor) -> Optional[torch.Tensor]:
        """Each row's pooled position, or None where trimming cannot apply to this batch."""
        if self.attn_mask is None:  # a causal mask is what makes the positions after it irrelevant
            return None
        if self.text_pool_type == "argmax":
            return text.argmax(dim=-1)
        eos = getattr(self, "text_eos_id", None)
        if self.text_pool_type == "eos" and eos is not None:
            is_eos = text == eos
            # open_clip pools a row without EOS at position 0; keep the full length for such batches
            return is_eos.int().argmax(dim=-1) if bool(is_eos.any(dim=1).all()) else None
        return None

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        n = text.shape[1]
        if self.trim_text_padding and not self.caller_trimmed:
            index = self.trim_pool_index(text)
            n = prefix_length(index, n) if index is not None else n
        if n >= self.positional_embedding.shape[0] or self.attn_mask is None:
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


def host_prefix_length(models: Sequence[nn.Module], tokens: torch.Tensor) -> Optional[int]:
    """The prefix of `tokens` (the batch's host copy, [B, L] at the context length) that every one
    of `models` (all that read these tokens) needs, or None where one of them cannot take a trimmed
    batch. Reads `tokens` on the host, so call it before the tokens move to the device."""
    if tokens.dim() != 2 or tokens.is_floating_point():  # not tokens: a cache's text features
        return None
    needed = []
    for model in models:
        modules = [m for m in _trimming_modules(model) if m.trim_text_padding]
        if not modules:  # a tower that does not trim runs whatever length it is given: keep it whole
            return None
        for m in modules:
            index = m.trim_pool_index(tokens) if tokens.shape[1] == m.context_length else None
            if index is None:
                return None
            needed.append(prefix_length(index, tokens.shape[1]))
    return max(needed) if needed else None


@contextlib.contextmanager
def caller_trims(models: Sequence[nn.Module]) -> Iterator[None]:
    """Within: the trimming towers of `models` take their tokens as trimmed already (by
    `host_prefix_length`), and read nothing from them."""
    modules = [m for model in models for m in _trimming_modules(model)]
    for m in modules:
        m.caller_trimmed = True
    try:
        yield
    finally:
        for m in modules:
            m.caller_trimmed = False


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
