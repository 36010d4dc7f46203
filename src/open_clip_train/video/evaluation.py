"""MSR-VTT evaluation across ranks, as `evaluate.py` does for images.

Each rank encodes a contiguous shard of the unique videos (`model.encode_video`) and of the
captions; features are gathered; videos that could not be decoded are left out with their captions
(reported as `num_bad_videos`, this rank's added to `bad`); each rank ranks its block of rows
(chunked) and the ranks are gathered, so every rank ends with the same metrics and none builds the
full score matrix.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .. import distributed as dist_env
from ..data.bad_samples import BadTally
from ..data.sampler import contiguous_shard
from ..distributed import World
from ..precision import autocast, input_dtype
from .dataset import VideoRetrievalData
from .metrics import summarize, video_ranks


@torch.no_grad()
def encode_all(model, data: VideoRetrievalData, world: World, device, precision: str, batch_size: int,
               workers: int, bad: BadTally | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(video features [V, D], text features [C, D], usable [V] bool), normalised, on every rank."""
    dtype = input_dtype(precision)
    shard = contiguous_shard(len(data.videos), world.rank, world.world_size)
    usable = torch.ones(shard.stop - shard.start, dtype=torch.bool)
    videos, texts = [], []
    with autocast(precision, device):
        for batch in data.video_loader(world.rank, world.world_size, batch_size, workers):
            frames = batch[0].to(device=device, dtype=dtype, non_blocking=True)
            videos.append(model.encode_video(frames, batch[1].to(device)).float())
            for b in getattr(batch, "bad", ()):
                usable[b.index - shard.start] = False
            if bad is not None:
                bad.add(getattr(batch, "bad", ()))
        tokens = data.texts[data.text_shard(world.rank, world.world_size)]
        for i in range(0, tokens.shape[0], batch_size):
            texts.append(F.normalize(model.encode_text(tokens[i:i + batch_size].to(device)).float(), dim=-1))
    if not (videos or texts):  # an empty shard still needs the width for the gather
        texts.append(model.encode_text(data.texts[:1].to(device)).float()[:0])
    dim = (videos or texts)[0].shape[1]
    vid = torch.cat(videos) if videos else texts[0].new_zeros((0, dim))
    txt = torch.cat(texts) if texts else vid.new_zeros((0, dim))
    usable = dist_env.all_gather_rows(usable.to(device=vid.device, dtype=torch.float32)) > 0.5
    return dist_env.all_gather_rows(vid), dist_env.all_gather_rows(txt), usable


def drop_unusable(vid: torch.Tensor, txt: torch.Tensor, t2v: torch.Tensor, usable: torch.Tensor):
    """Leave out the videos that could not be decoded, and their captions (renumbered)."""
    if bool(usable.all()):
        return vid, txt, t2v
    new_index = torch.cumsum(usable.long(), 0) - 1
    keep = usable[t2v]
    return vid[usable], txt[keep], new_index[t2v[keep]]


@torch.no_grad()
def evaluate_video_retrieval(model, data: VideoRetrievalData, world: World, device, precision: str, batch_size: int,
                             workers: int, chunk_size: int = 1024, bad: BadTally | None = None,
                             prefix: str = "msrvtt") -> Dict[str, float]:
    """The `msrvtt_*` metrics (video/metrics.py) over the videos that decode, plus num_bad_videos."""
    was_training = model.training
    model.eval()
    try:
        vid, txt, usable = encode_all(model, data, world, device, precision, batch_size, workers, bad)
    finally:
        model.train(was_training)
    num_bad = int((~usable).sum())
    if num_bad == len(usable):
        raise ValueError(f"none of the {len(usable)} evaluation videos could be decoded")
    vid, txt, t2v = drop_unusable(vid, txt, data.text_to_video.to(vid.device), usable)
    rows_v = contiguous_shard(vid.shape[0], world.rank, world.world_size)
    rows_t = contiguous_shard(txt.shape[0], world.rank, world.world_size)
    t2v_r, v2t_r = video_ranks(vid, txt, t2v, chunk_size=chunk_size, video_rows=rows_v, text_rows=rows_t)
    return summarize(dist_env.all_gather_rows(t2v_r), dist_env.all_gather_rows(v2t_r), num_bad_videos=num_bad,
                     prefix=prefix)
