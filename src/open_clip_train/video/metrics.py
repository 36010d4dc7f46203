"""Video-text retrieval metrics (MSR-VTT protocol), on normalised video and caption features.

Definitions (C captions, V videos, caption c belongs to video v(c)):

* T2V: each caption ranks all V videos; rank = 1 + #(videos other than v(c) scoring >= the score
  of v(c)). Ties count against the query (as the COCO metrics in `retrieval.py`).
* V2T: each video ranks all C captions by its best caption; rank = 1 + #(captions of other videos
  scoring >= the best score among its own captions). On 1k-A (one caption per video) that is the
  plain transposed ranking.
* R@K = share of queries with rank <= K (a fraction, not a percentage); median rank = the lower
  median of the 1-based ranks; mean rank = their mean.

Differences from CLIP4Clip / TeachCLIP `metrics.py`: their `compute_metrics` finds the position of
the ground truth in a sorted row, so ties count *for* the query (and exact duplicates misalign
rows); on multi-caption sets their V2T (`tensor_video_to_text_sim`) first reduces every *other*
video's captions to their maximum, i.e. a video ranks among V caption groups, while here it ranks
among all C captions (every negative caption counts), so their V2T recall is higher on the full
split. T2V is the same definition up to ties. Chunked: memory is bounded by chunk_size^2 scores
(the 2,990 x 59,800 full split never forms its full matrix); results equal the dense computation.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..retrieval import i2t_ranks, t2i_ranks

RECALL_KS = (1, 5, 10)


def video_ranks(video_features: torch.Tensor, text_features: torch.Tensor, text_to_video: torch.Tensor, *,
                chunk_size: int = 1024, video_rows: slice | None = None, text_rows: slice | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2v ranks of the caption rows, v2t ranks of the video rows), 1-based; rows select a rank's share."""
    t2v = t2i_ranks(video_features, text_features, text_to_video, rows=text_rows, chunk_size=chunk_size)
    v2t = i2t_ranks(video_features, text_features, text_to_video, rows=video_rows, chunk_size=chunk_size)
    return t2v, v2t


def _summary(prefix: str, ranks: torch.Tensor) -> Dict[str, float]:
    ranks = torch.as_tensor(ranks)
    if ranks.ndim != 1 or ranks.numel() == 0 or ranks.dtype.is_floating_point or int(ranks.min()) < 1:
        raise ValueError(f"{prefix} ranks must be a non-empty 1-D integer tensor of values >= 1")
    out = {f"{prefix}_R@{k}": (ranks <= k).double().mean().item() for k in RECALL_KS}
    out[f"{prefix}_median_rank"] = float(torch.median(ranks).item())
    out[f"{prefix}_mean_rank"] = ranks.double().mean().item()
    return out


def summarize(t2v: torch.Tensor, v2t: torch.Tensor, *, num_bad_videos: int = 0,
              prefix: str = "msrvtt") -> Dict[str, float]:
    """results.jsonl keys: {prefix}_t2v_*, {prefix}_v2t_*, {prefix}_num_videos/_num_captions, num_bad_videos."""
    out = {**_summary(f"{prefix}_t2v", t2v), **_summary(f"{prefix}_v2t", v2t)}
    out[f"{prefix}_num_videos"] = int(torch.as_tensor(v2t).numel())
    out[f"{prefix}_num_captions"] = int(torch.as_tensor(t2v).numel())
    out["num_bad_videos"] = int(num_bad_videos)
    return out


def video_retrieval_metrics(video_features: torch.Tensor, text_features: torch.Tensor,
                            text_to_video: torch.Tensor, *, chunk_size: int = 1024, num_bad_videos: int = 0,
                            prefix: str = "msrvtt") -> Dict[str, float]:
    t2v, v2t = video_ranks(video_features, text_features, text_to_video, chunk_size=chunk_size)
    return summarize(t2v, v2t, num_bad_videos=num_bad_videos, prefix=prefix)


def format_seed(metrics: Dict[str, float], prefix: str = "msrvtt") -> str:
    """The two lines the seed notes use, in percent:
    'Text-to-Video: R@1: 3.4 - R@5: 8.7 - R@10: 12.5 - Median R: 119.0 - Mean R: 145.5' and the
    same for Video-to-Text."""
    def line(d: str) -> str:
        r = [f"R@{k}: {100 * metrics[f'{prefix}_{d}_R@{k}']:.1f}" for k in RECALL_KS]
        return " - ".join(r + [f"Median R: {metrics[f'{prefix}_{d}_median_rank']:.1f}",
                               f"Mean R: {metrics[f'{prefix}_{d}_mean_rank']:.1f}"])
    return f"Text-to-Video: {line('t2v')}\nVideo-to-Text: {line('v2t')}"
