"""`--accum-freq K`: one optimizer step over K micro-batches whose gradients equal those of one
step on the whole batch, for every trainable parameter.

Feature caching (upstream's scheme): every micro-batch runs once without autograd to cache its
outputs, then again with autograd, its own rows concatenated with the other micro-batches'
cached rows, so each loss sees the whole batch. The whole batch's loss L(f_1, .., f_K, s) depends
on the per-sample features f_j of micro-batch j and on the parameters the loss uses directly, s
(the logit scale; --siglip's logit bias). Its gradient is

    sum_j dL/df_j . df_j/dtheta   +   dL/ds . ds/dtheta.

Pass j back-propagates dL/df_j through its own forward, so the feature terms add up to the whole
batch's exactly. The direct term appears in every pass in full: upstream adds it K times (a logit
scale gradient K x too large, which SGD-family optimisers, gradient clipping and the logged norm
all see). Here only the last pass keeps s in the graph; the others see its value detached. The
last one, because under DDP the synchronising backward must reach every parameter that takes a
gradient in this step. Every micro-batch runs its forward twice: the cost of the scheme.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch

from .precision import autocast

Terms = Dict[str, torch.Tensor]
Micro = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # images, tokens, sample ids

# Model outputs the loss uses directly, not per sample: their gradient is taken from one pass.
DIRECT_KEYS = ("logit_scale", "logit_bias")


def detach_direct(out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`out` with the loss's directly used parameters (DIRECT_KEYS) cut from the graph."""
    return {k: (v.detach() if k in DIRECT_KEYS and isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def forward_backward_accum(
        objective, net: torch.nn.Module, micro: Sequence[Micro], backward: Callable[[torch.Tensor], None],
        precision: str, device: torch.device, no_sync: Optional[Callable[[], ContextManager]] = None,
) -> Terms:
    """Accumulate the gradients of the whole batch `micro` into `.grad`; returns its loss terms
    (detached). `no_sync` (DDP's) is entered for every backward but the last, so the gradient
    all-reduce runs once per step."""
    with torch.no_grad(), autocast(precision, device):
        cached = [objective.cache_micro(net, images, tokens, ids) for images, tokens, ids in micro]
    last = len(micro) - 1
    terms_sum: Terms = {}
    for j, (images, tokens, _) in enumerate(micro):
        with (no_sync() if no_sync is not None and j < last else nullcontext()):
            with autocast(precision, device):
                terms = objective.terms_cached(net, images, tokens, cached, j, direct_grad=j == last)
                loss = sum(terms.values())
            backward(loss)
        for k, v in terms.items():  # every pass computes the same whole-batch values
            terms_sum[k] = terms_sum.get(k, 0) + v.detach() / len(micro)
    return terms_sum
