"""TeachCLIP's training objective for `--dataset-type msrvtt --distill` (the trainer's Objective
interface: `terms`, `cache_micro` / `terms_cached` for --accum-freq, `tokenizer`, `needs_ids`,
`on_unlock`).

Per batch: the student's [B_text, B_video] logits (logit scale x text . video) and its AFA frame
scores; the teacher's targets, live (the frozen teacher fed the student's frames and tokens) or
read from one or more video teacher caches by the batch's ids (video number, sen_id); then
video/distill_loss.py's terms, each logged by name.

Under DDP every rank gathers the batch (the student's features with autograd, as --gather-with-grad)
and computes the loss of the global batch: the gathered gradients sum over ranks, DDP averages
them, and the step equals one process's with the same global batch.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..accumulate import detach_direct
from ..distill.losses import merge_micro_batch
from ..distributed import World
from ..errors import UserError, flag
from .distill_loss import VideoDistillLoss
from .teacher import TeacherFeatures, TextFeatures, VideoFeatures

Terms = Dict[str, torch.Tensor]
PROBE = ["a man is playing a guitar on a stage while people dance", "cat"]


def _gather_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.world_size == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()))


def _gather(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _gather_mask(mask: torch.Tensor, world: World) -> torch.Tensor:
    return _gather(mask.to(torch.uint8), world).bool()


def _map_features(parts: Sequence[TeacherFeatures], join: Callable, join_mask: Callable) -> TeacherFeatures:
    """One TeacherFeatures from `parts`, each field joined by `join` (`join_mask` for masks)."""
    v, t = [p.video for p in parts], [p.text for p in parts]
    words = join([x.words for x in t]) if t[0].words is not None else None
    return TeacherFeatures(VideoFeatures(join([x.frames for x in v]), join([x.video for x in v]),
                                         join_mask([x.mask for x in v])),
                           TextFeatures(join([x.sentence for x in t]), words))


def _gather_features(f: TeacherFeatures, world: World) -> TeacherFeatures:
    return _map_features([f], lambda xs: _gather(xs[0], world), lambda ms: _gather_mask(ms[0], world))


def _cat_features(parts: Sequence[TeacherFeatures]) -> TeacherFeatures:
    return _map_features(parts, torch.cat, torch.cat)


class VideoDistillObjective:
    needs_ids = False  # video batches always carry their (video number, sen_id) ids
    sharing = None

    def __init__(self, cfg, video, train_data: str, model: torch.nn.Module, world: World, device: torch.device,
                 student_tokenizer: Callable):
        from .distill_run import build_teacher, cache_dirs, open_caches, video_id_map

        self.world, self.device, self.tokenizer = world, device, student_tokenizer
        d = cfg.distill
        self.loss = VideoDistillLoss(cfg.video_distill)
        c = self.loss.cfg
        logging.info(f"video distillation: coarse {c.coarse} x {c.coarse_weight}, fine {c.fine} x {c.fine_weight}, "
                     f"ground truth x {c.gt_weight}")
        pool = getattr(model, "video_pool", None)
        self.fine = pool is not None and pool.afa is not None
        if not self.fine:
            logging.info(f"video distillation: the fine term is off ({flag('video_pooling')} {video.model.pooling} "
                         "has no AFA frame scores; afa or seqtransf-afa switch it on)")
        self.teachers: List = []
        self.live = None
        if d.teacher_cache:
            from .teacher_cache import CachedVideoTeacher

            try:
                caches = open_caches(d.teacher_cache, video, train_data, d.teacher_model.split(","))
            except ValueError as e:
                raise UserError(f"{flag('teacher_cache')}: {e}") from None
            self.teachers = [CachedVideoTeacher(c, device) for c in caches]
            self.video_ids = video_id_map(video, train_data)
            logging.info(f"video teacher: {len(caches)} cache(s) ({', '.join(cache_dirs(d.teacher_cache))}); "
                         "targets averaged over teachers")
        else:
            try:
                inputs = build_teacher(d.teacher_model, d.teacher_pretrained, max_words=video.max_words,
                                       device=device, precision=cfg.precision,
                                       trust_checkpoint=cfg.trust_checkpoint)
            except ValueError as e:
                raise UserError(f"{flag('teacher_model')} {d.teacher_model}: {e}") from None
            self._check_inputs(inputs, model, video)
            self.live = inputs.teacher
            logging.info(f"video teacher: {d.teacher_model} live (frozen, eval, no autograd, outside DDP)")

    def _check_inputs(self, inputs, model, video) -> None:
        """A live teacher sees the student's frames and tokens: they must be what it expects."""
        from ..distill.sharing import preprocess_difference
        from .training import word_limited

        diff = preprocess_difference(model.visual.preprocess_cfg, inputs.preprocess_cfg)
        if diff is not None:
            raise UserError(f"teacher {inputs.teacher.kind or 'model'} sees frames differently from the student "
                            f"({diff}); extract a teacher cache (extract_teacher) and pass {flag('teacher_cache')}")
        self.max_words, self.token_len = video.max_words, int(inputs.tokenizer(PROBE).shape[1])
        have = word_limited(self.tokenizer, video.max_words)(PROBE)
        if not torch.equal(self._teacher_tokens(have), inputs.tokenizer(PROBE)):
            raise UserError("the teacher tokenizes captions differently from the student; extract a teacher cache "
                            f"(extract_teacher) and pass {flag('teacher_cache')}")

    def _teacher_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The student's word-limited tokens at the teacher's length (past max_words: padding)."""
        kept = tokens[:, :self.max_words]
        return torch.nn.functional.pad(kept, (0, self.token_len - kept.shape[1]))

    def token_readers(self, model: torch.nn.Module) -> Optional[List[torch.nn.Module]]:
        """The student alone; None with a live teacher (it reads the tokens cut to max_words)."""
        return [model] if self.live is None else None

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def _teacher_rows(self, frames, mask, tokens, ids) -> List[TeacherFeatures]:
        """Every teacher's features of this rank's rows: live, or a cache's rows by the batch's ids
        (kept on the host, so the lookup reads nothing from the device)."""
        if self.live is not None:
            return [self.live.encode(frames, mask, self._teacher_tokens(tokens))]
        if ids is None:
            raise RuntimeError("a cached video teacher needs the batch's ids")
        ids = ids.numpy()  # the loader's host tensor (numpy() refuses a device tensor: no sync here)
        videos = [self.video_ids[int(n)] for n in ids[:, 0]]
        sen = ids[:, 1].tolist()
        return [t.features(videos, sen) for t in self.teachers]

    @torch.no_grad()
    def _targets(self, rows: List[TeacherFeatures]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Every teacher's global [B, B] logits and [B, T] relevance from its rows on all ranks."""
        heads = [self.live] if self.live is not None else self.teachers
        logits, relevance = [], []
        for head, f in zip(heads, rows):
            g = _gather_features(f, self.world)
            logits.append(head.similarity(g.video, g.text))
            relevance.append(head.relevance(g.video, g.text))
        return logits, relevance

    def _loss(self, out: Dict[str, torch.Tensor], mask: torch.Tensor, rows: List[TeacherFeatures]) -> Terms:
        """The global batch's terms from this rank's student outputs, frame mask and teacher rows."""
        w = self.world
        video = _gather_grad(out["image_features"], w)
        text = _gather_grad(out["text_features"], w)
        logits = out["logit_scale"] * text @ video.T
        t_logits, t_rel = self._targets(rows)
        scores = _gather_grad(out["frame_scores"], w) if self.fine else None
        gmask = _gather_mask(mask, w) if self.fine else None
        dt = logits.dtype
        return self.loss(logits, scores, gmask, [t.to(dt) for t in t_logits],
                         [r.to(dt) for r in t_rel] if self.fine else [])

    def terms(self, net, images, tokens: torch.Tensor, ids: Optional[torch.Tensor] = None) -> Terms:
        frames, mask = images
        # The teacher first: a cache's rows are copied over before the student's kernels are
        # queued, so the copy waits on none of them.
        rows = self._teacher_rows(frames, mask, tokens, ids)
        return self._loss(net(images, tokens), mask, rows)

    # --accum-freq (accumulate.py): the no-grad pass caches the student's per-sample outputs and
    # the teacher's rows; each grad pass sees the whole accumulated batch, its own rows live.
    @torch.no_grad()
    def cache_micro(self, net, images, tokens: torch.Tensor, ids: Optional[torch.Tensor] = None) -> dict:
        frames, mask = images
        rows = self._teacher_rows(frames, mask, tokens, ids)
        out = net(images, tokens)
        return {**{k: out[k] for k in self._per_sample}, "mask": mask, "teacher": rows}

    def terms_cached(self, net, images, tokens: torch.Tensor, cached: Sequence[dict], j: int,
                     direct_grad: bool = True) -> Terms:
        out = net(images, tokens)
        if not direct_grad:
            out = detach_direct(out)
        merged = merge_micro_batch(cached, j, out, self._per_sample)
        rows = [_cat_features([c["teacher"][i] for c in cached]) for i in range(len(cached[0]["teacher"]))]
        return self._loss(merged, torch.cat([c["mask"] for c in cached]), rows)

    @property
    def _per_sample(self) -> Tuple[str, ...]:
        return ("image_features", "text_features") + (("frame_scores",) if self.fine else ())

    def on_unlock(self, towers: Sequence[str]) -> None:
        """The teacher shares nothing with the student: unlocking changes nothing here."""
