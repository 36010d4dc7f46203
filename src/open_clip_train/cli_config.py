"""The CLI edge's mapping of argparse's Namespace onto the typed run config (`config_from_args`),
done once in `main`; the upstream flags this trainer parses but refuses (`UNSUPPORTED`)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from .config import DistCfg, EvalCfg, ModelCfg, OutputCfg, RunCfg, TrainCfg
from .data import DataCfg
from .distill import DistillCfg
from .errors import UserError
from .freeze import FreezeCfg, TowerSchedule
from .distill.headalign import HeadAlignCfg
from .losses import LossCfg
from .model_overrides import ModelOverrides, validate as validate_overrides
from .objective import ObjectiveCfg
from .optim import OptimCfg
from .params import build_parser
from .remote_sync import RemoteSyncCfg
from .schedule import KINDS as SCHEDULE_KINDS
from .zeroshot import ZeroShotCfg

# Upstream flags this trainer accepts (so old command lines parse) but does not implement.
# Setting one is refused with a clear message rather than silently ignored.
UNSUPPORTED = {
    "torchscript": "TorchScript is not supported by this trainer (deprecated in PyTorch, and a scripted model "
                   "cannot carry the text trim and frozen-trunk wrappers); use --torchcompile",
    "trace": "tracing is not supported by this trainer (see --torchscript); use --torchcompile",
    "use_bnb_linear": "bitsandbytes int8 linear layers are not supported by this trainer (CUDA-only; not among "
                      "the pinned dependencies); drop the flag",
    "horovod": "Horovod is not supported by this trainer (it runs under torchrun / SLURM with DDP); drop the flag",
    "dist_url": "--dist-url is not supported by this trainer (torchrun's environment gives the rendezvous); "
                "drop the flag",
}


def refuse_unsupported(args: argparse.Namespace, defaults: Dict[str, Any]) -> None:
    for dest, what in UNSUPPORTED.items():
        if hasattr(args, dest) and getattr(args, dest) != defaults.get(dest):
            flag = "--" + dest.replace("_", "-")
            raise UserError(f"{flag}: {what}")


def config_from_args(a: argparse.Namespace) -> RunCfg:
    refuse_unsupported(a, build_parser().parse_args([]).__dict__)
    if a.torchcompile and a.compile_frozen == "on":
        raise UserError("--torchcompile compiles the whole model, its frozen trunk included; drop --compile-frozen")
    if a.lr_scheduler not in SCHEDULE_KINDS:
        raise UserError(f"--lr-scheduler {a.lr_scheduler!r}: choose one of {', '.join(SCHEDULE_KINDS)}")
    freeze = FreezeCfg(
        image=TowerSchedule(
            lock=a.lock_image,
            unlocked_groups=a.lock_image_unlocked_groups,
            freeze_norm=a.lock_image_freeze_bn_stats,
            unfreeze_at_epoch=a.unfreeze_image_at_epoch,
            unfreeze_groups=a.unlocked_image_groups,
        ),
        text=TowerSchedule(
            lock=a.lock_text,
            unlocked_groups=a.lock_text_unlocked_layers,
            freeze_norm=a.lock_text_freeze_layer_norm,
            unfreeze_at_epoch=a.unfreeze_text_at_epoch,
            unfreeze_groups=a.unlocked_text_layers,
        ),
        new_lr_scale=a.unfreeze_new_lr_scale,
        unfreeze_warmup_steps=a.unfreeze_warmup_steps,
        lock_patterns=tuple(a.lock_pattern or ()),
        lr_mults=tuple(tuple(x) for x in (a.lr_mult or ())),
        frozen_train_mode=a.frozen_train_mode,
    )
    report_to = tuple(x.strip() for x in (a.report_to or "").split(",") if x.strip())
    return RunCfg(
        model=ModelCfg(
            name=a.model,
            pretrained=a.pretrained or None,
            pretrained_image=a.pretrained_image,
            pretrained_image_path=a.pretrained_image_path,
            pretrained_text_path=a.pretrained_text_path,
            text_tokenizer=a.text_tokenizer,
            precision=a.precision,
            grad_checkpointing=a.grad_checkpointing,
            torchcompile=a.torchcompile,
            compile_frozen=a.compile_frozen,
            trim_text_padding=a.trim_text_padding,
            overrides=_overrides(a),
        ),
        data=DataCfg(
            dataset_type=a.dataset_type,
            train_data=a.train_data,
            val_data=a.val_data,
            train_image_root=a.train_image_root,
            val_image_root=a.val_image_root,
            coco_caption_sampling=a.coco_caption_sampling,
            train_num_samples=a.train_num_samples,
            val_num_samples=a.val_num_samples,
            batch_size=a.batch_size,
            workers=a.workers,
            seed=a.seed,
            csv_separator=a.csv_separator,
            csv_img_key=a.csv_img_key,
            csv_caption_key=a.csv_caption_key,
            dataset_resampled=a.dataset_resampled,
            upsampling_factors=_upsampling(a),
            max_bad_samples_fraction=a.max_bad_samples_fraction,
        ),
        train=TrainCfg(
            epochs=a.epochs,
            batch_size=a.batch_size,
            accum_freq=a.accum_freq,
            grad_clip_norm=a.grad_clip_norm,
            lr_scheduler=a.lr_scheduler,
            warmup=a.warmup,
            epochs_cooldown=a.epochs_cooldown,
            lr_cooldown_power=a.lr_cooldown_power,
            lr_cooldown_end=a.lr_cooldown_end,
            skip_scheduler=a.skip_scheduler,
            seed=a.seed,
            log_every_n_steps=a.log_every_n_steps,
            no_augment=a.no_augment,
            frozen_feature_cache=a.frozen_feature_cache or None,
            skip_nonfinite_steps=a.skip_nonfinite_steps,
        ),
        optim=OptimCfg(name=a.opt, lr=a.lr, beta1=a.beta1, beta2=a.beta2, eps=a.eps, weight_decay=a.wd,
                       momentum=0.9 if getattr(a, "momentum", None) is None else a.momentum),
        loss=LossCfg(local_loss=a.local_loss, gather_with_grad=a.gather_with_grad, siglip=a.siglip,
                     loss_dist_impl=a.loss_dist_impl),
        freeze=freeze,
        eval=EvalCfg(val_frequency=a.val_frequency, val_at_start=a.val_at_start, chunk_size=a.eval_chunk_size),
        output=OutputCfg(
            logs=a.logs,
            name=a.name,
            report_to=report_to,
            wandb_project_name=a.wandb_project_name,
            wandb_notes=a.wandb_notes,
            save_frequency=a.save_frequency,
            save_most_recent=a.save_most_recent,
            delete_previous_checkpoint=a.delete_previous_checkpoint,
            save_every_n_steps=a.save_every_n_steps,
            resume=a.resume,
            debug=a.debug,
            copy_codebase=a.copy_codebase,
            remote_sync=RemoteSyncCfg(remote=a.remote_sync, frequency=a.remote_sync_frequency,
                                      protocol=a.remote_sync_protocol),
            log_local=a.log_local,
        ),
        objective=_objective(a),
        zeroshot=ZeroShotCfg(imagenet_val=a.imagenet_val, imagenet_v2=a.imagenet_v2, data=a.zeroshot_data,
                             classnames=a.zeroshot_classnames, templates=a.zeroshot_templates, name=a.zeroshot_name,
                             frequency=a.zeroshot_frequency, batch_size=a.batch_size, workers=a.workers),
        dist=DistCfg(backend=a.dist_backend, device=a.device, ddp_static_graph=a.ddp_static_graph,
                     use_bn_sync=a.use_bn_sync),
        dry_run=a.dry_run,
        trust_checkpoint=a.trust_checkpoint,
        malloc_retain=a.malloc_retain,
        video=_video(a),
        settings=dict(vars(a)),
    )


def _upsampling(a: argparse.Namespace):
    """--train-data-upsampling-factors: checked here against --train-data's '::' sources, as upstream."""
    f = a.train_data_upsampling_factors
    if f is None:
        return None
    if not a.dataset_resampled:
        raise UserError("--train-data-upsampling-factors weights draws with replacement: add --dataset-resampled "
                        "(as upstream)")
    if a.train_data:
        from .data.wds import shard_weights

        try:
            shard_weights(a.train_data, f)
        except ValueError as e:
            raise UserError(f"--train-data-upsampling-factors: {e}") from None
    return f


def _overrides(a: argparse.Namespace) -> ModelOverrides:
    """Upstream's --force-* / --image-* / --aug-cfg, checked (one line) before any work."""
    def tup(v):
        return None if v is None else tuple(v)

    o = ModelOverrides(force_quick_gelu=a.force_quick_gelu, force_custom_text=a.force_custom_text,
                       force_patch_dropout=a.force_patch_dropout, force_image_size=tup(a.force_image_size),
                       force_context_length=a.force_context_length, image_mean=tup(a.image_mean),
                       image_std=tup(a.image_std), image_interpolation=a.image_interpolation,
                       image_resize_mode=a.image_resize_mode, aug_cfg=dict(a.aug_cfg or {}))
    try:
        validate_overrides(o)
    except ValueError as e:
        raise UserError(str(e)) from None
    return o
_VIDEO_FLAGS = ("msrvtt_train_split", "msrvtt_test", "video_root", "frames_root", "video_pooling", "max_frames",
                "max_words", "video_temporal_layers")


def _video(a: argparse.Namespace):
    """--dataset-type msrvtt and its flags; the video flags without it are refused (they would do nothing)."""
    from .video import VideoModelCfg
    from .video.training import VideoCfg

    if a.dataset_type != "msrvtt":
        defaults = build_parser().parse_args([]).__dict__
        given = [f for f in _VIDEO_FLAGS if getattr(a, f) != defaults[f]]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is a video flag: it needs --dataset-type msrvtt")
        return None
    if a.headalign:
        raise UserError("--dataset-type msrvtt trains without --headalign for now")
    try:
        return VideoCfg(train_split=a.msrvtt_train_split, test_split=a.msrvtt_test, video_root=a.video_root,
                        frames_root=a.frames_root, max_words=a.max_words,
                        model=VideoModelCfg(pooling=a.video_pooling, max_frames=a.max_frames,
                                            temporal_layers=a.video_temporal_layers))
    except ValueError as e:
        raise UserError(str(e)) from None


def _objective(a: argparse.Namespace) -> ObjectiveCfg:
    """--distill / --teacher-* (upstream's --distill-model/--distill-pretrained also switch it on,
    as upstream does when both are given) and --headalign."""
    loss = LossCfg(local_loss=a.local_loss, gather_with_grad=a.gather_with_grad, siglip=a.siglip,
                   loss_dist_impl=a.loss_dist_impl)
    teacher = a.teacher_model or a.distill_model
    teacher_weights = a.teacher_pretrained or a.distill_pretrained
    distill = None
    if a.distill or (a.distill_model and a.distill_pretrained):
        if a.teacher_cache and a.no_teacher_share:
            raise UserError("--no-teacher-share is for a live teacher; with --teacher-cache no teacher runs")
        try:
            distill = DistillCfg(teacher_model=teacher or "", teacher_pretrained=teacher_weights,
                                 weight=a.distill_weight, temperature=a.distill_temperature,
                                 teacher_cache=a.teacher_cache or None,
                                 teacher_text_tokenizer=a.teacher_text_tokenizer, share=not a.no_teacher_share)
        except ValueError as e:
            raise UserError(f"--distill: {e}") from None
    elif teacher or teacher_weights or a.teacher_cache or a.no_teacher_share:
        raise UserError("--teacher-model/--teacher-pretrained/--teacher-cache/--no-teacher-share given without "
                        "--distill")
    headalign = None
    if a.headalign:
        try:
            headalign = HeadAlignCfg(weight=a.headalign_weight, mode=a.headalign_mode)
        except ValueError as e:
            raise UserError(f"--headalign: {e}") from None
    return ObjectiveCfg(loss=loss, distill=distill, headalign=headalign,
                        pretrained=a.pretrained or None, precision=a.precision,
                        trust_checkpoint=a.trust_checkpoint, coca_caption_weight=a.coca_caption_loss_weight,
                        coca_contrastive_weight=a.coca_contrastive_loss_weight,
                        video_distill=_video_distill(a, distill))


_VIDEO_DISTILL_FLAGS = ("distill_coarse", "distill_fine", "distill_gt_weight", "distill_coarse_weight",
                        "distill_fine_weight")


def _video_distill(a: argparse.Namespace, distill):
    """TeachCLIP's methods and weights for --dataset-type msrvtt --distill (refused elsewhere)."""
    given = [f for f in _VIDEO_DISTILL_FLAGS if getattr(a, f) is not None]
    if a.dataset_type != "msrvtt" or distill is None:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} is a video distillation flag: it needs "
                            "--dataset-type msrvtt --distill")
        return None
    from .video.distill_loss import VideoDistillCfg

    try:
        return VideoDistillCfg(coarse=a.distill_coarse or "pear", fine=a.distill_fine or "ce",
                               gt_weight=a.distill_gt_weight, coarse_weight=a.distill_coarse_weight,
                               fine_weight=a.distill_fine_weight)
    except ValueError as e:
        raise UserError(f"--distill: {e}") from None
