"""The training objective of one (micro-)batch: student forward plus named loss terms.

* plain: `{"contrastive_loss"}` (open_clip's ClipLoss / SigLipLoss);
* `--distill`: `{"contrastive_loss", "distill_loss"}` against a frozen teacher that is fed the
  student's batch (as upstream does) and reuses the student's trunk / text features where they
  are provably the same computation (teacher.plan_sharing), until the student unlocks that part;
  or, with `--teacher-cache`, against the teacher's embeddings read by the batch's sample ids
  (teacher_cache.CachedTeacher; no teacher model is built);
* `--headalign`: adds `{"headalign_loss"}`: the new head aligned to the checkpoint's own frozen
  head on the same trunk features (no teacher);
* CoCa (a model with `text_decoder`): `{"contrastive_loss" x --coca-contrastive-loss-weight,
  "caption_loss"}`, as open_clip's CoCaLoss (`CaptionLoss`).

The trainer only calls `terms`, `cache_micro` / `terms_cached` (for --accum-freq, through
accumulate.forward_backward_accum) and `on_unlock`;
each takes the batch's sample ids (`ids`, None unless `needs_ids`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .distill import DistillCfg, DistillLoss, TokenizerPair, TrunkCapture, concat_outputs, merge_micro_batch
from .accumulate import detach_direct
from .distributed import World
from .errors import UserError, flag
from .distill.headalign import HeadAlignCfg, HeadAlignLoss, build_reference_head, read_head_state
from .losses import ContrastiveLoss, LossCfg, merge_terms
from .models.text_trim import set_text_padding_trim, text_padding_trim

Terms = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ObjectiveCfg:
    loss: LossCfg
    distill: Optional[DistillCfg] = None
    headalign: Optional[HeadAlignCfg] = None
    pretrained: Optional[str] = None  # the student's checkpoint: the reference head comes from it
    precision: str = "fp32"
    trust_checkpoint: bool = False  # teacher weights may need full unpickling (--trust-checkpoint)
    coca_caption_weight: float = 2.0  # --coca-caption-loss-weight (CoCa models only)
    coca_contrastive_weight: float = 1.0  # --coca-contrastive-loss-weight
    video_distill: Optional[Any] = None  # video.distill_loss.VideoDistillCfg (--dataset-type msrvtt --distill)


class CaptionLoss(torch.nn.Module):
    """CoCa's terms, as open_clip's CoCaLoss: the contrastive loss scaled by its weight, and the
    weighted next-token cross entropy of the decoder's logits against the shifted tokens, pad
    tokens ignored."""

    def __init__(self, contrastive: torch.nn.Module, caption_weight: float, contrastive_weight: float, pad_id: int):
        super().__init__()
        self.contrastive, self.caption_weight, self.contrastive_weight = contrastive, caption_weight, contrastive_weight
        self.ce = torch.nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, out: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        terms = {k: self.contrastive_weight * v for k, v in self.contrastive(out).items()}
        terms["caption_loss"] = self.caption_weight * self.ce(out["logits"].permute(0, 2, 1), out["labels"])
        return terms


class Objective:
    def __init__(self, cfg: ObjectiveCfg, model: torch.nn.Module, world: World, device: torch.device,
                 student_tokenizer: Callable):
        self.cfg = cfg
        self.runner = None  # the teacher source: TeacherRunner (live) or CachedTeacher
        self.pair: Optional[TokenizerPair] = None
        self.capture: Optional[TrunkCapture] = None
        self.reference = None
        self.headalign = None
        self.sharing = None
        self.tokenizer = student_tokenizer
        if cfg.distill is not None:
            self._build_teacher(cfg, model, world, device, student_tokenizer)
        else:
            self.loss = ContrastiveLoss(cfg.loss, world.rank, world.world_size)
            if getattr(model, "text_decoder", None) is not None:  # CoCa (preflight refused distill/accum)
                self.loss = CaptionLoss(self.loss, cfg.coca_caption_weight, cfg.coca_contrastive_weight,
                                        getattr(model, "pad_id", 0))
        if cfg.headalign is not None:
            self._build_headalign(cfg, model)
        if self.runner is not None and self.sharing is not None and self.sharing.is_shared("image_trunk"):
            self.capture = self.capture or TrunkCapture(model)

    @property
    def needs_ids(self) -> bool:
        """Whether batches must carry sample ids (a cached teacher looks its rows up by them)."""
        return self.cfg.distill is not None and bool(self.cfg.distill.teacher_cache)

    # ------------------------------------------------------------------ build
    def _distill_loss(self, cfg, world) -> DistillLoss:
        d = cfg.distill
        return DistillLoss(d.weight, d.temperature, local_loss=cfg.loss.local_loss,
                           gather_with_grad=cfg.loss.gather_with_grad, rank=world.rank, world_size=world.world_size)

    def _build_cached_teacher(self, cfg, model, world, device) -> None:
        """The teacher's embeddings come from the cache: no teacher model, no teacher tokens.
        The manifest was checked against this run in trainer.check_config."""
        from .distill.sharing import preprocess_difference
        from .distill.cache import CachedTeacher, TeacherCache, preprocess_fields

        try:
            cache = TeacherCache(cfg.distill.teacher_cache)
        except ValueError as e:
            raise UserError(f"{flag('teacher_cache')}: {e}") from None
        logging.info(cache.describe())
        diff = preprocess_difference(preprocess_fields(model.visual.preprocess_cfg), cache.manifest["preprocess"])
        if diff is not None:  # fine for a cache (the teacher had its own view), but worth knowing
            logging.info(f"teacher cache: the teacher's image view differs from the student's ({diff})")
        self.runner = CachedTeacher(cache, device)
        self.loss = self._distill_loss(cfg, world)

    def _build_teacher(self, cfg, model, world, device, student_tokenizer) -> None:
        from .distill.sharing import SharingPlan, plan_sharing, preprocess_difference
        from .distill.teacher import Teacher, TeacherRunner

        d = cfg.distill
        if cfg.loss.siglip:
            raise UserError(f"{flag('distill')} with {flag('siglip')} is not supported (the distill loss is CLIP's softmax form)")
        if d.teacher_cache:
            self._build_cached_teacher(cfg, model, world, device)
            return
        try:
            teacher = Teacher.from_pretrained(d.teacher_model, d.teacher_pretrained, device=device,
                                              precision=cfg.precision, text_tokenizer=d.teacher_text_tokenizer,
                                              trust_checkpoint=cfg.trust_checkpoint)
        except ValueError as e:
            raise UserError(f"{flag('teacher_model')} {d.teacher_model}: {e}") from None
        set_text_padding_trim(teacher.model, text_padding_trim(model))  # --no-trim-text-padding covers both
        diff = preprocess_difference(model.visual.preprocess_cfg, teacher.preprocess_cfg)
        if diff is not None:
            raise UserError(f"teacher {d.teacher_model} preprocesses images differently from the student ({diff}); "
                            "a teacher with its own image view is not supported yet")
        self.pair = TokenizerPair(student_tokenizer, teacher.tokenizer)
        if not self.pair.same:
            self.tokenizer = self.pair.joint  # the batch carries both token streams
        if d.share:
            # The teacher is fed the student's image tensor, so only the weights decide sharing.
            self.sharing = plan_sharing(model, teacher, student_preprocess_is_augmented=False,
                                        same_text_tokens=self.pair.same, teacher_gets_student_batch=True)
        else:
            self.sharing = SharingPlan({p: False for p in ("image_trunk", "text")},
                                       {p: f"sharing switched off ({flag('no_teacher_share')})" for p in ("image_trunk", "text")})
        for line in self.sharing.lines():
            logging.info(line)
        self.runner = TeacherRunner(teacher, self.sharing)
        self.loss = self._distill_loss(cfg, world)

    def _build_headalign(self, cfg, model) -> None:
        if not cfg.pretrained:
            raise UserError(f"{flag('headalign')} needs {flag('pretrained')}: the checkpoint's own image head is the reference")
        try:
            self.reference = build_reference_head(model, read_head_state(cfg.pretrained, cfg.trust_checkpoint))
        except ValueError as e:
            raise UserError(f"{flag('headalign')}: {e}") from None
        self.headalign = HeadAlignLoss(cfg.headalign.weight, cfg.headalign.mode)
        self.capture = TrunkCapture(model)
        logging.info(f"headalign: aligning the new head to {cfg.pretrained}'s image head "
                     f"({cfg.headalign.mode}, weight {cfg.headalign.weight})")

    def token_readers(self, model: torch.nn.Module) -> Optional[List[torch.nn.Module]]:
        """The models that read the batch's tokens as they are (the student; a live teacher on the
        same tokens), or None where a teacher reads a token stream of its own."""
        if self.pair is None:
            return [model]
        if self.pair.same and hasattr(self.runner, "teacher"):
            return [model, self.runner.teacher.model]
        return None

    # ------------------------------------------------------------------ per batch
    def _split(self, tokens: torch.Tensor):
        if self.pair is None:
            return tokens, None
        if self.pair.same:
            return tokens, tokens
        return self.pair.split(tokens)

    def _teacher(self, images, t_tok, out, feats, ids, early=None):
        return early if early is not None else self.runner(images, t_tok, out, feats, ids=ids)

    def _teacher_early(self, images, t_tok, ids):
        """A teacher that needs nothing from the student (a cache) runs before the student's
        forward: its rows' copy to the device then waits on no queued student kernels."""
        if self.runner is None or getattr(self.runner, "reads_student", True):
            return None
        return self.runner(images, t_tok, None, None, ids=ids)

    def terms(self, net, images: torch.Tensor, tokens: torch.Tensor, ids: Optional[torch.Tensor] = None) -> Terms:
        s_tok, t_tok = self._split(tokens)
        early = self._teacher_early(images, t_tok, ids)
        out = net(images, s_tok)
        feats = self.capture.pop() if self.capture is not None else None
        if self.runner is not None:
            terms = self.loss(out, self._teacher(images, t_tok, out, feats, ids, early))
        else:
            terms = self.loss(out)
        if self.headalign is not None:
            terms = merge_terms(terms, self.headalign(out, self.reference(feats)))
        return terms

    @torch.no_grad()
    def cache_micro(self, net, images: torch.Tensor, tokens: torch.Tensor, ids: Optional[torch.Tensor] = None) -> dict:
        """No-grad pass of gradient-cache accumulation: everything the grad pass reuses."""
        s_tok, t_tok = self._split(tokens)
        early = self._teacher_early(images, t_tok, ids)
        out = net(images, s_tok)
        feats = self.capture.pop() if self.capture is not None else None
        entry = {k: out[k] for k in ("image_features", "text_features")}
        if self.runner is not None:
            entry["teacher"] = self._teacher(images, t_tok, out, feats, ids, early)
        if self.headalign is not None:
            entry["reference"] = self.reference(feats)
        return entry

    def terms_cached(self, net, images: torch.Tensor, tokens: torch.Tensor, cached: Sequence[dict], j: int,
                     direct_grad: bool = True) -> Terms:
        """Grad pass for micro-batch j against the cached rest of the accumulated batch.
        `direct_grad` False: the logit scale / bias enter as values only (accumulate.py: their
        gradient must come from one pass of the K)."""
        s_tok, _ = self._split(tokens)
        out = net(images, s_tok)
        if not direct_grad:
            out = detach_direct(out)
        if self.capture is not None:
            self.capture.pop()  # not needed again: free it
        merged = merge_micro_batch(cached, j, out)
        if self.runner is not None:
            terms = self.loss(merged, concat_outputs([c["teacher"] for c in cached]))
        else:
            terms = self.loss(merged)
        if self.headalign is not None:
            terms = merge_terms(terms, self.headalign(merged, torch.cat([c["reference"] for c in cached])))
        return terms

    # ------------------------------------------------------------------ schedule
    def on_unlock(self, towers: Sequence[str]) -> None:
        """Once the student trains a part, the teacher can no longer reuse its features."""
        if self.sharing is None:
            return
        for tower, part in (("image", "image_trunk"), ("text", "text")):
            if tower in towers and self.sharing.is_shared(part):
                self.sharing.disable(part)
                logging.info(f"teacher: stops sharing the student's {part} (unlocked)")
