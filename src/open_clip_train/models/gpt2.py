"""GPT-2 text tower, its tokenizer, and the CLIP model that pairs it with an open_clip image tower.

open_clip 3.3.0 cannot build GPT-2 text towers through its HF path (no gpt2 entry in
hf_configs.arch_dict, `add_pooling_layer` passed to GPT2Model, no pad token, no last-token
pooler), so the tower is built here from a plain `transformers.GPT2Config` (no hub access).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from open_clip.model import CustomTextCLIP, _build_vision_tower

from .text_trim import prefix_length

PROJ_TYPES = ("mlp", "linear")


def _build_proj(width: int, output_dim: int, proj_type: str) -> nn.Module:
    if proj_type == "linear":
        return nn.Linear(width, output_dim, bias=False)
    if proj_type == "mlp":
        # Same shape rule as open_clip's HF towers: hidden = mean of input and output widths.
        hidden = (width + output_dim) // 2
        return nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, output_dim, bias=False),
        )
    raise ValueError(f"unknown text proj_type {proj_type!r}; expected one of {PROJ_TYPES}")


class GPT2TextTower(nn.Module):
    """Causal GPT-2 encoder pooled at the first EOS token, then projected to the joint space.
    Runs on the batch's prefix up to its last EOS (text_trim: the padding after it changes nothing)."""

    trim_text_padding: bool = True
    caller_trimmed: bool = False  # text_trim.caller_trims: the tokens come trimmed already

    def __init__(
            self,
            gpt2_cfg: Mapping[str, Any],
            output_dim: int,
            context_length: int,
            proj_type: str = "mlp",
    ):
        super().__init__()
        config = GPT2Config(**gpt2_cfg)
        if context_length > config.n_positions:
            raise ValueError(f"context_length {context_length} exceeds GPT-2 n_positions {config.n_positions}")
        if config.eos_token_id is None or not 0 <= config.eos_token_id < config.vocab_size:
            raise ValueError(f"gpt2 eos_token_id must lie in [0, {config.vocab_size}), got {config.eos_token_id}")
        self.transformer = GPT2Model(config)
        self.proj = _build_proj(config.n_embd, output_dim, proj_type)
        self.context_length = context_length
        self.vocab_size = config.vocab_size
        self.eos_token_id = config.eos_token_id
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.output_dim = output_dim

    @classmethod
    def from_text_cfg(cls, text_cfg: Mapping[str, Any], output_dim: int) -> "GPT2TextTower":
        return cls(
            text_cfg["gpt2"],
            output_dim=output_dim,
            context_length=text_cfg["context_length"],
            proj_type=text_cfg.get("proj_type", "mlp"),
        )

    def trim_pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.first_eos_index(tokens)

    def first_eos_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of each row's first EOS; the last position for rows without one (truncated input)."""
        is_eos = tokens == self.eos_token_id
        first = is_eos.int().argmax(dim=1)  # argmax returns the first maximum
        return torch.where(is_eos.any(dim=1), first, torch.full_like(first, tokens.shape[1] - 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        eos_idx = self.first_eos_index(tokens)
        if self.trim_text_padding and not self.caller_trimmed:  # else trimmed on the host (text_trim)
            tokens = tokens[:, :prefix_length(eos_idx, tokens.shape[1])]
        # No padding mask: causality already hides the padding after each row's EOS from its pooled
        # position, and with a mask transformers reads it on the host to choose the attention path
        # (a wait for the device on every step).
        hidden = self.transformer(input_ids=tokens, use_cache=False).last_hidden_state
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), eos_idx]
        return self.proj(pooled)

    def layer_groups(self) -> list[list[str]]:
        """Param names (relative to this tower) from input to output: embeddings, blocks, last block + ln_f."""
        names = [n for n, _ in self.named_parameters() if n.startswith("transformer.")]
        n_layer = len(self.transformer.h)

        def under(prefix: str) -> list[str]:
            return [n for n in names if n.startswith(prefix)]

        groups = [under("transformer.wte.") + under("transformer.wpe.")]
        groups += [under(f"transformer.h.{i}.") for i in range(n_layer - 1)]
        groups.append(under(f"transformer.h.{n_layer - 1}.") + under("transformer.ln_f."))
        return groups

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.transformer.activation_checkpointing_disable()


class GPT2CLIP(CustomTextCLIP):
    """CustomTextCLIP whose `.text` is a GPT2TextTower; forward/encode_* are inherited unchanged."""

    def __init__(
            self,
            embed_dim: int,
            vision_cfg: Mapping[str, Any],
            text_cfg: Mapping[str, Any],
            quick_gelu: bool = False,
            init_logit_scale: float = float(np.log(1 / 0.07)),
            init_logit_bias: float | None = None,
            nonscalar_logit_scale: bool = False,
            cast_dtype: torch.dtype | None = None,
            output_dict: bool = False,
    ):
        # Skip CustomTextCLIP.__init__: it would build an open_clip text tower from text_cfg.
        nn.Module.__init__(self)
        self.output_dict = output_dict
        self.visual = _build_vision_tower(embed_dim, dict(vision_cfg), quick_gelu, cast_dtype)
        self.text = GPT2TextTower.from_text_cfg(text_cfg, output_dim=embed_dim)
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size
        lshape = [1] if nonscalar_logit_scale else []
        self.logit_scale = nn.Parameter(torch.ones(lshape) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones(lshape) * init_logit_bias) if init_logit_bias is not None else None


class CausalTokenizer:
    """Wraps a local HF tokenizer: text + EOS, truncated so EOS stays last, right-padded to context_length."""

    def __init__(self, path: str, context_length: int, model_vocab_size: int | None = None):
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        self.context_length = context_length
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} defines no eos_token; a causal text tower pools at EOS")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.vocab_size = len(self.tokenizer)
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer at {path} has {self.vocab_size} tokens but the model's vocab_size is "
                f"{model_vocab_size}: ids would index past the embedding table"
            )

    def encode_one(self, text: str, context_length: int) -> list[int]:
        ids = self.tokenizer.encode(" ".join(text.split()), add_special_tokens=False)
        ids = ids[: context_length - 1] + [self.eos_token_id]
        return ids + [self.pad_token_id] * (context_length - len(ids))

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        return torch.tensor([self.encode_one(t, ctx) for t in texts], dtype=torch.long)
