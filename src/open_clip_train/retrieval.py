"""Image-text retrieval metrics.

Two families live here:

* COCO-style retrieval (``retrieval_metrics``): several captions per image; an
  image's captions are all positives for it.  Computed in bounded memory by
  counting, never holding more than a ``chunk_size x chunk_size`` score block.
* Upstream-compatible pairwise metrics (``pairwise_metrics``, ``ClipValLoss``):
  exactly what open_clip 3.3.0's ``evaluate`` reports, where row ``i`` of the
  image and text features is a pair and only the diagonal is positive.  For a
  multi-caption set fed as ``(image_features[text_to_image], text_features)``
  this is *deflated*: an image's other captions count as negatives, so e.g.
  with 5 captions per image even perfect features give R@1 of about 0.2.  Keep
  it only for comparison with old ``results.jsonl`` files.

Conventions for the COCO metrics (decisions, documented here once):

* Scores are dot products computed in float32 (inputs are assumed normalised).
* Ties count against: a negative whose score equals the positive's ranks above it.
* i2t ranks an image by its *best* positive caption.  Every image must have at
  least one caption (an image without one has no defined rank and silently
  dropping it would change the denominator), so ``i2t_ranks`` raises
  ``ValueError`` naming how many images lack captions.  ``t2i_ranks`` allows
  caption-less images: they are just extra distractors.
* Median rank is ``torch.median`` of the ranks, i.e. the *lower* median for an
  even count (upstream's pairwise median floors numpy's averaged median
  instead; the two can differ for an even count).
"""
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "retrieval_metrics",
    "i2t_ranks",
    "t2i_ranks",
    "summarize_ranks",
    "pairwise_metrics",
    "ClipValLoss",
]

Labels = Union[torch.Tensor, Sequence[int]]
RECALL_KS = (1, 5, 10)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got shape {getattr(t, 'shape', None)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"feature dims differ: image_features {tuple(image_features.shape)} "
            f"vs text_features {tuple(text_features.shape)}"
        )


def _check_labels(text_to_image: Labels, num_images: int, num_texts: int, device: torch.device) -> torch.Tensor:
    labels = torch.as_tensor(text_to_image)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must have shape [{num_texts}] (one entry per caption), got {tuple(labels.shape)}"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_images:
        raise ValueError(f"text_to_image values must lie in [0, {num_images}), got range [{lo}, {hi}]")
    return labels.to(device=device, dtype=torch.long)


def _validate(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: Labels, chunk_size: int
) -> torch.Tensor:
    """Checks everything and returns text_to_image as a long tensor on the features' device."""
    _check_features(image_features, text_features)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    # NaN scores would compare False everywhere and silently yield rank 1.
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    return _check_labels(text_to_image, image_features.shape[0], text_features.shape[0], image_features.device)


def _row_indices(n: int, rows: Optional[slice], device: torch.device) -> torch.Tensor:
    if rows is None:
        rows = slice(None)
    if not isinstance(rows, slice):
        raise ValueError(f"rows must be a slice or None, got {type(rows).__name__}")
    return torch.arange(n, device=device)[rows]


def _count_ranks(
    queries: torch.Tensor,
    query_idx: torch.Tensor,
    query_labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """1 + #negative keys scoring >= the best positive key, for each selected query.

    A key is positive for a query when their labels are equal.  Per block of
    queries: pass 1 finds the best positive score (visiting only key chunks that
    hold a positive), pass 2 counts negatives at or above it.  Both passes score
    identical (block, chunk) pairs, so scores are bitwise equal and exact ties
    are resolved consistently against the query.
    """
    out = torch.empty(query_idx.shape[0], dtype=torch.long, device=queries.device)
    num_keys = keys.shape[0]
    for r0 in range(0, query_idx.shape[0], chunk_size):
        idx = query_idx[r0:r0 + chunk_size]
        q = queries[idx].float()
        q_lab = query_labels[idx].unsqueeze(1)
        best = torch.full((idx.shape[0],), float("-inf"), device=queries.device)
        for c0 in range(0, num_keys, chunk_size):
            pos = q_lab == key_labels[c0:c0 + chunk_size].unsqueeze(0)
            if pos.any():
                s = q @ keys[c0:c0 + chunk_size].float().T
                best = torch.maximum(best, s.masked_fill(~pos, float("-inf")).amax(dim=1))
        count = torch.zeros_like(out[r0:r0 + chunk_size])
        for c0 in range(0, num_keys, chunk_size):
            pos = q_lab == key_labels[c0:c0 + chunk_size].unsqueeze(0)
            s = q @ keys[c0:c0 + chunk_size].float().T
            count += ((s >= best.unsqueeze(1)) & ~pos).sum(dim=1)
        out[r0:r0 + chunk_size] = count + 1
    return out


@torch.no_grad()
def i2t_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Labels,
    rows: Optional[slice] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based image->text ranks (best positive caption) for the image ``rows``."""
    labels = _validate(image_features, text_features, text_to_image, chunk_size)
    num_images = image_features.shape[0]
    missing = int((torch.bincount(labels, minlength=num_images) == 0).sum())
    if missing:
        raise ValueError(
            f"{missing} of {num_images} images have no caption in text_to_image; "
            "image->text rank is undefined for them, drop them before evaluating"
        )
    idx = _row_indices(num_images, rows, image_features.device)
    image_ids = torch.arange(num_images, device=image_features.device)
    return _count_ranks(image_features, idx, image_ids, text_features, labels, chunk_size)


@torch.no_grad()
def t2i_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Labels,
    rows: Optional[slice] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """1-based text->image ranks for the caption ``rows`` (one positive image each)."""
    labels = _validate(image_features, text_features, text_to_image, chunk_size)
    idx = _row_indices(text_features.shape[0], rows, text_features.device)
    image_ids = torch.arange(image_features.shape[0], device=image_features.device)
    return _count_ranks(text_features, idx, labels, image_features, image_ids, chunk_size)


def _summarize(prefix: str, ranks: torch.Tensor) -> Dict[str, float]:
    if ranks.ndim != 1 or ranks.numel() == 0:
        raise ValueError(f"{prefix} ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or int(ranks.min()) < 1:
        raise ValueError(f"{prefix} ranks must be integers >= 1")
    out = {f"{prefix}_R@{k}": (ranks <= k).double().mean().item() for k in RECALL_KS}
    out[f"{prefix}_median_rank"] = float(torch.median(ranks).item())  # lower median
    out[f"{prefix}_mean_rank"] = ranks.double().mean().item()
    return out


def summarize_ranks(i2t: torch.Tensor, t2i: torch.Tensor) -> Dict[str, float]:
    """COCO metric dict from 1-based ranks (e.g. gathered from all workers)."""
    return {**_summarize("coco_i2t", torch.as_tensor(i2t)), **_summarize("coco_t2i", torch.as_tensor(t2i))}


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: Labels,
    *,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """COCO-protocol recall@{1,5,10}, median and mean rank in both directions."""
    i2t = i2t_ranks(image_features, text_features, text_to_image, chunk_size=chunk_size)
    t2i = t2i_ranks(image_features, text_features, text_to_image, chunk_size=chunk_size)
    return summarize_ranks(i2t, t2i)


@torch.no_grad()
def pairwise_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: Union[torch.Tensor, float],
    *,
    dense_limit: int = 8192,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """open_clip 3.3.0 ``get_clip_metrics``: row i of each input is a pair, only the diagonal is positive.

    Mirrors upstream operation for operation (input dtype, full dense matrix,
    argsort ranking whose tie order is whatever argsort gives, numpy median
    floored) so values match old results; only the return type is plain float.
    Deflated for multi-caption data, see the module docstring.

    Above ``dense_limit`` pairs (COCO val has 25,000: upstream's dense matrix and argsort
    would take ~7.5 GB) the position of each pair is counted in chunks instead: the number of
    entries scoring strictly higher, which is what argsort gives whenever there are no exact ties.
    """
    _check_features(image_features, text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"pairwise metrics need one text per image row, got {image_features.shape[0]} images "
            f"and {text_features.shape[0]} texts"
        )
    n = image_features.shape[0]
    if n > dense_limit:
        preds_by_name = _pairwise_positions_chunked(image_features, text_features, chunk_size)
    else:
        logits_per_image = (logit_scale * image_features @ text_features.t()).detach().cpu()
        logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_image.t()}
        ground_truth = torch.arange(len(text_features)).view(-1, 1)
        preds_by_name = {}
        for name, logit in logits.items():
            ranking = torch.argsort(logit, descending=True)
            preds_by_name[name] = torch.where(ranking == ground_truth)[1].numpy()  # 0-based rank of the pair
    metrics: Dict[str, float] = {}
    for name, preds in preds_by_name.items():
        metrics[f"{name}_mean_rank"] = float(preds.mean() + 1)
        metrics[f"{name}_median_rank"] = float(np.floor(np.median(preds)) + 1)
        for k in RECALL_KS:
            metrics[f"{name}_R@{k}"] = float(np.mean(preds < k))
    return metrics


def _pairwise_positions_chunked(
    image_features: torch.Tensor, text_features: torch.Tensor, chunk_size: int
) -> Dict[str, np.ndarray]:
    img, txt = image_features.float(), text_features.float()
    n = img.shape[0]
    starts = range(0, n, chunk_size)
    # The pair scores come from the same diagonal blocks the counting pass computes, so a
    # pair's own score is bit-identical in both places and never counts as "above" itself.
    diag = torch.cat([torch.diagonal(img[r:r + chunk_size] @ txt[r:r + chunk_size].t()) for r in starts])
    above_i2t = torch.zeros(n, dtype=torch.long)
    above_t2i = torch.zeros(n, dtype=torch.long)
    for r in starts:
        rows = slice(r, min(r + chunk_size, n))
        for c in starts:
            cols = slice(c, min(c + chunk_size, n))
            block = img[rows] @ txt[cols].t()  # [rows, cols] image i vs text j
            above_i2t[rows] += (block > diag[rows, None]).sum(1).cpu()
            above_t2i[cols] += (block > diag[None, cols]).sum(0).cpu()
    return {"image_to_text": above_i2t.numpy(), "text_to_image": above_t2i.numpy()}


class ClipValLoss:
    """Upstream's ``clip_val_loss``: per-batch symmetric CE with diagonal labels, sample-weighted mean.

    The matmul runs in the inputs' dtype (or the caller's autocast, as upstream);
    the cross-entropy runs in float32 as autocast would.  Accumulation is in
    float64, which differs from upstream's float32 running sum only by rounding.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Union[torch.Tensor, float]
    ) -> None:
        _check_features(image_features, text_features)
        batch_size = image_features.shape[0]
        if text_features.shape[0] != batch_size:
            raise ValueError(f"batch has {batch_size} images but {text_features.shape[0]} texts")
        if isinstance(logit_scale, torch.Tensor):
            logit_scale = logit_scale.mean()  # upstream averages per-device copies
        logits = (logit_scale * image_features @ text_features.t()).float()
        labels = torch.arange(batch_size, device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        self.total += loss.item() * batch_size
        self.count += batch_size

    def compute(self) -> float:
        if self.count == 0:
            raise ValueError("ClipValLoss.compute() called before any update()")
        return self.total / self.count
