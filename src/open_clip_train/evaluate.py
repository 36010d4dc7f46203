"""Retrieval evaluation shared across ranks.

Each rank encodes a contiguous shard of the unique images and of the captions; the features
are gathered, each rank ranks its own block of rows (chunked), and the ranks are gathered, so
no rank builds the full score matrix and every rank ends with the same metrics.
Reports the standard COCO protocol (`coco_*`) and upstream's pairwise metrics under upstream's
key names (`image_to_text_R@1`, ..., `clip_val_loss`) for comparison with older results.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from . import distributed as dist_env
from .data import BadTally, RetrievalData
from .data.sampler import contiguous_shard
from .distributed import World
from .precision import autocast, input_dtype
from .retrieval import ClipValLoss, i2t_ranks, pairwise_metrics, summarize_ranks, t2i_ranks


@torch.no_grad()
def encode_all(model, data: RetrievalData, world: World, device, precision: str, batch_size: int, workers: int,
               bad: BadTally | None = None):
    """(image_features [N, D], text_features [T, D], usable [N] bool) normalised, in dataset
    order, on every rank; `usable` is False for images that could not be decoded, which this
    rank's ones are also added to `bad`."""
    dtype = input_dtype(precision)
    image_chunks, text_chunks = [], []
    loader = data.image_loader(world.rank, world.world_size, batch_size, workers)
    shard = contiguous_shard(len(data.images), world.rank, world.world_size)
    usable = torch.ones(shard.stop - shard.start, dtype=torch.bool)
    with autocast(precision, device):
        for batch in loader:
            images = batch[0].to(device=device, dtype=dtype, non_blocking=True)
            image_chunks.append(F.normalize(model.encode_image(images).float(), dim=-1))
            for b in getattr(batch, "bad", ()):
                usable[b.index - shard.start] = False
            if bad is not None:
                bad.add(getattr(batch, "bad", ()))
        shard = data.text_shard(world.rank, world.world_size)
        texts = data.texts[shard]
        for i in range(0, texts.shape[0], batch_size):
            tokens = texts[i : i + batch_size].to(device)
            text_chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    dim = model.logit_scale.new_empty(0)  # device/dtype anchor for empty shards
    img = torch.cat(image_chunks) if image_chunks else dim.new_zeros((0, _embed_dim(model, data, device)))
    txt = torch.cat(text_chunks) if text_chunks else dim.new_zeros((0, img.shape[1]))
    usable = dist_env.all_gather_rows(usable.to(device=img.device, dtype=torch.float32)) > 0.5
    return dist_env.all_gather_rows(img.float()), dist_env.all_gather_rows(txt.float()), usable


def drop_unusable(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, usable: torch.Tensor):
    """Leave out the images that could not be decoded, and their captions (renumbered)."""
    if bool(usable.all()):
        return img, txt, t2i
    new_index = torch.cumsum(usable.long(), 0) - 1
    keep_txt = usable[t2i]
    return img[usable], txt[keep_txt], new_index[t2i[keep_txt]]


def _embed_dim(model, data, device) -> int:
    with torch.no_grad():
        return model.encode_text(data.texts[:1].to(device)).shape[-1]


@torch.no_grad()
def evaluate_retrieval(model, data: RetrievalData, world: World, device, precision: str,
                       batch_size: int, workers: int, chunk_size: int, bad: BadTally | None = None) -> Dict[str, float]:
    """Metrics over the images that decode (bad ones, with their captions, are left out and
    reported as `num_bad_images`; this rank's are added to `bad`)."""
    was_training = model.training
    model.eval()
    try:
        img, txt, usable = encode_all(model, data, world, device, precision, batch_size, workers, bad)
    finally:
        model.train(was_training)
    num_bad = int((~usable).sum())
    if num_bad == len(usable):
        raise ValueError(f"none of the {len(usable)} evaluation images could be decoded")
    img, txt, t2i = drop_unusable(img, txt, data.text_to_image.to(img.device), usable)
    rows_i = contiguous_shard(img.shape[0], world.rank, world.world_size)
    rows_t = contiguous_shard(txt.shape[0], world.rank, world.world_size)
    r_i2t = dist_env.all_gather_rows(i2t_ranks(img, txt, t2i, rows=rows_i, chunk_size=chunk_size))
    r_t2i = dist_env.all_gather_rows(t2i_ranks(img, txt, t2i, rows=rows_t, chunk_size=chunk_size))
    metrics = summarize_ranks(r_i2t, r_t2i)

    # Upstream's view of the same set: every caption paired with its image, pairs on the
    # diagonal are the only positives (an image's other captions count as negatives).
    logit_scale = model.logit_scale.exp().float()
    pair_img = img[t2i]
    metrics.update(pairwise_metrics(pair_img, txt, logit_scale))
    val_loss = ClipValLoss()
    for i in range(0, txt.shape[0], batch_size):
        val_loss.update(pair_img[i : i + batch_size], txt[i : i + batch_size], logit_scale)
    metrics["clip_val_loss"] = val_loss.compute()
    metrics["num_images"] = int(img.shape[0])
    metrics["num_bad_images"] = num_bad
    metrics["num_captions"] = int(txt.shape[0])
    return metrics
