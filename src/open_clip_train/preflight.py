"""Pre-flight checks: user errors that need no data and no real weights, found before any
process group, run directory or data read (`check_config`), so a typo costs seconds, not a
cluster allocation: the files the flags name, the model name, the tokenizer, the whole freezing
schedule (resolved on a meta-device model), checkpoints that do not fit, and a teacher cache
that does not match the run."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from .config import RunCfg
from .errors import UserError
from .freeze import build_plan
from .models import create_model, get_tokenizer, loss_model_kwargs
from .models.weights import fit_problems, load_torch_file
from .model_overrides import check_for_model, create_model_kwargs, tokenizer_context_length


@contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn the library's ValueError / missing-file errors about user input into UserError."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UserError(f"{what}: {e}") from None


def _data_file_kind(dataset_type: str, path: str) -> Optional[str]:
    """'coco' / 'csv' when `path` must be one local file, else None (webdataset URLs, synthetic)."""
    if dataset_type in ("coco", "csv"):
        return dataset_type
    if dataset_type == "auto":
        return {"json": "coco", "csv": "csv", "tsv": "csv"}.get(path.rsplit(".", 1)[-1].lower())
    return None


def check_config(cfg: RunCfg) -> None:
    """User errors that need no data and no real weights, checked before any process group,
    run directory or data read: the files the flags name, the model name, the tokenizer and
    the whole freezing schedule (resolved on a meta-device model)."""
    d, m = cfg.data, cfg.model
    if not d.train_data and not d.val_data and d.dataset_type != "synthetic" and not cfg.zeroshot.enabled:
        raise UserError("nothing to do: give --train-data and/or --val-data (or a zero-shot set)")
    _check_zeroshot(cfg)
    if cfg.output.copy_codebase and cfg.output.logs.lower() == "none":
        raise UserError("--copy-codebase records the source in the run directory; --log-dir none has none")
    _check_remote_sync(cfg)
    _check_coca(cfg)
    if cfg.video is not None:
        from .video.training import check as check_video

        with user_errors("--dataset-type msrvtt"):
            check_video(cfg.video, d.train_data, d.val_data)
    for flag, path in (("--train-data", d.train_data), ("--val-data", d.val_data)):
        if path and _data_file_kind(d.dataset_type, path) and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    for flag, path in (("--train-image-root", d.train_image_root), ("--val-image-root", d.val_image_root)):
        if path and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: no such directory")
    for flag, path in (("--pretrained", m.pretrained), ("--pretrained-image-path", m.pretrained_image_path),
                       ("--pretrained-text-path", m.pretrained_text_path), ("--text-tokenizer", m.text_tokenizer)):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or directory (weights are only read from local paths)")
    obj = cfg.objective
    if obj.distill is not None and cfg.video is not None:
        from .video.distill_run import preflight as check_video_distill

        with _quiet():
            check_video_distill(cfg)
    elif obj.distill is not None:
        for flag, path in (("--teacher-pretrained", obj.distill.teacher_pretrained),
                           ("--teacher-cache", obj.distill.teacher_cache)):
            if path and not Path(path).exists():
                raise UserError(f"{flag} {path}: no such file or directory")
        with _quiet(), user_errors(f"--teacher-model {obj.distill.teacher_model}"):
            teacher, _ = create_model(obj.distill.teacher_model, device="meta")
        if obj.distill.teacher_pretrained:
            _check_fits("--teacher-pretrained", obj.distill.teacher_pretrained, teacher, cfg.trust_checkpoint,
                        unexpected_ok=True)
        if obj.distill.teacher_cache:
            with _quiet():
                _check_teacher_cache(cfg)
    if obj.headalign is not None and not m.pretrained:
        raise UserError("--headalign needs --pretrained: the checkpoint's own image head is the reference")
    resume = cfg.output.resume
    if resume is not None and resume != "latest" and not Path(resume).is_file():
        raise UserError(f"--resume {resume}: no such checkpoint")
    with _quiet():
        _check_overrides(cfg)
        with user_errors(f"--model {m.name}"):
            skeleton, _ = create_model(m.name, device="meta", model_kwargs=loss_model_kwargs(cfg.objective.loss.siglip),
                                       overrides=create_model_kwargs(m.overrides))
            if cfg.video is not None:
                from .video import attach_video

                attach_video(skeleton, cfg.video.model)
        with user_errors("--text-tokenizer" if m.text_tokenizer else f"--model {m.name}"):
            get_tokenizer(m.name, m.text_tokenizer, context_length=tokenizer_context_length(m.overrides))
        with user_errors(f"--model {m.name}"):  # e.g. a tower the freezing schedule cannot place
            plan = build_plan(skeleton, cfg.freeze, cfg.train.epochs)
        if cfg.train.frozen_feature_cache:
            _check_frozen_feature_cache(cfg, skeleton, plan)
    if resume is not None and resume != "latest":
        _check_fits("--resume", resume, skeleton, cfg.trust_checkpoint)
    if m.pretrained and not m.pretrained.endswith(".safetensors") and Path(m.pretrained).is_file():
        with user_errors("--pretrained"):  # loading is tolerant of other architectures; unpickling is not
            load_torch_file(m.pretrained, cfg.trust_checkpoint, mmap=True)


def _check_overrides(cfg: RunCfg) -> None:
    """--force-* overrides the model's towers cannot take (open_clip would crash late or ignore them)."""
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.model.name)
    if model_cfg is not None:
        try:
            check_for_model(cfg.model.overrides, model_cfg)
        except ValueError as e:
            raise UserError(str(e)) from None


def _check_coca(cfg: RunCfg) -> None:
    """What CoCa (a model with a caption decoder: `multimodal_cfg` in its config) does not train with here."""
    import open_clip

    if "multimodal_cfg" not in (open_clip.get_model_config(cfg.model.name) or {}):
        return
    name = f"--model {cfg.model.name} (CoCa)"
    if cfg.train.accum_freq > 1:
        raise UserError(f"{name} with --accum-freq is not supported: the accumulation here caches each micro-batch's "
                        "embeddings only, and the caption loss needs its decoder logits; raise --batch-size instead")
    obj = cfg.objective
    if obj.distill is not None or obj.headalign is not None:
        raise UserError(f"{name} with --distill / --teacher-cache / --headalign is not supported: they are defined "
                        "on the contrastive embeddings only; drop them")


def _check_remote_sync(cfg: RunCfg) -> None:
    from .remote_sync import RemoteSyncError, check

    rs = cfg.output.remote_sync
    if rs.enabled and cfg.output.logs.lower() == "none":
        raise UserError("--remote-sync copies the run directory; --log-dir none has none")
    try:
        check(rs)
    except RemoteSyncError as e:
        raise UserError(str(e)) from None


def _check_zeroshot(cfg: RunCfg) -> None:
    """The zero-shot folders, class-name and template files (listed, no image read)."""
    from .zeroshot import build_sets

    zs = cfg.zeroshot
    if (zs.classnames or zs.templates or zs.name) and not zs.data:
        raise UserError("--zeroshot-classnames / --zeroshot-templates / --zeroshot-name need --zeroshot-data DIR")
    if zs.frequency < 0:
        raise UserError(f"--zeroshot-frequency {zs.frequency}: must be >= 0 (0 turns zero-shot off)")
    if zs.enabled:
        try:
            build_sets(zs)
        except ValueError as e:
            raise UserError(str(e)) from None


def _check_fits(flag: str, path: str, skeleton: torch.nn.Module, trust: bool, unexpected_ok: bool = False) -> None:
    """A checkpoint of another architecture (or one that needs unpickling) is refused before any
    data or weights are read: memory-mapped, only its keys and shapes are looked at."""
    if str(path).endswith(".safetensors"):
        return
    with user_errors(flag):
        state = load_torch_file(path, trust, mmap=True)
    sd = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{flag} {path}: not a checkpoint (no state_dict)")
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    problems = [p for p in fit_problems(sd, skeleton.state_dict()) if not (unexpected_ok and p.startswith("unexpected"))]
    if problems:
        arch = f" (saved from model {state['model']!r})" if isinstance(state.get("model"), str) else ""
        raise UserError(f"{flag} {path}{arch} does not fit this model: {'; '.join(problems)}")


def _check_teacher_cache(cfg: RunCfg) -> None:
    """--teacher-cache against this run, before any weights or images are read: the manifest's
    teacher (model, weights hash when --teacher-pretrained is given, its preprocessing), dataset
    (type, annotation file hash, CSV columns) and, from the training set's ids, that every sample
    has its rows."""
    from .data import resolve_dataset_type, train_captioned
    from .distill.cache import TeacherCache, expected_fields, image_root_of

    d, data = cfg.objective.distill, cfg.data
    try:
        cache = TeacherCache(d.teacher_cache)
        expected = expected_fields(teacher_model=d.teacher_model, teacher_pretrained=d.teacher_pretrained)
        if data.train_data or data.dataset_type == "synthetic":
            kind = resolve_dataset_type(data.dataset_type, data.train_data or "")
            if kind not in ("coco", "csv"):
                raise UserError(f"--teacher-cache needs coco or csv training data (samples keyed by stable ids), "
                                f"not {kind}")
            expected.update(expected_fields(dataset_type=kind, annotations=data.train_data,
                                            columns=[data.csv_img_key, data.csv_caption_key] if kind == "csv" else None))
        captioned = train_captioned(data) if data.train_data else None
        if captioned is not None:  # the same ids from other images: refused
            expected["dataset.image_root"] = image_root_of(captioned.images)
        cache.check(expected)
        if captioned is not None:
            cache.check_covers(captioned.pair_ids(), f"--train-data {data.train_data}")
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--teacher-cache: {e}") from None


def _check_frozen_feature_cache(cfg: RunCfg, skeleton: torch.nn.Module, plan) -> None:
    """--frozen-feature-cache before any weights or images are read: that it applies (locked part,
    deterministic input, an objective that does not read images itself) and, for an existing
    cache, the manifest's model, precision and training data (for video also the frame source,
    sampling, --max-frames and --max-words). Its weights hash is checked once the model is built
    (frozen_features.FrozenFeatures.prepare)."""
    from .data import resolve_dataset_type, train_captioned
    from .distill.cache import file_sha256
    from .distill.cache import image_root_of
    from .frozen_features import frozen_parts
    from .freeze import apply_trainable
    from .video.feature_cache import FeatureCache

    t, data, obj = cfg.train, cfg.data, cfg.objective
    flag = "--frozen-feature-cache"
    if not t.no_augment and cfg.video is None:  # video frames always use the eval transform
        raise UserError(f"{flag} needs --no-augment: with random augmentation the frozen outputs change every epoch")
    if cfg.model.torchcompile:  # the cache swaps forwards in and out, which a compiled graph would not see
        raise UserError(f"{flag} cannot be used with --torchcompile: the cached run skips the frozen part the "
                        "compiled graph would run; use one or the other")
    if cfg.freeze.frozen_train_mode:
        raise UserError(f"{flag} cannot be used with --frozen-train-mode (frozen modules in train mode are not "
                        "deterministic)")
    if obj.headalign is not None or (obj.distill is not None and not obj.distill.teacher_cache):
        raise UserError(f"{flag}: this objective runs on the images themselves (a live teacher or --headalign); "
                        "use --teacher-cache for the teacher, or drop the flag")
    kind = resolve_dataset_type(data.dataset_type, data.train_data or "") if data.train_data else data.dataset_type
    if cfg.video is None and kind not in ("coco", "csv"):
        raise UserError(f"{flag} needs coco, csv or msrvtt training data (samples keyed by stable ids), not {kind}")
    if cfg.video is not None and not data.train_data:
        raise UserError(f"{flag} needs --train-data (it caches the training videos' frames and captions)")
    apply_trainable(skeleton, list(plan.rules_at(0)))
    parts = frozen_parts(skeleton)
    if not parts and not any(u.epoch == 0 for u in plan.unlocks):
        raise UserError(f"{flag}: neither the image trunk nor the text tower is locked; lock one (--lock-image, "
                        "--lock-text) or drop the flag")
    if not (Path(t.frozen_feature_cache) / "manifest.json").is_file():
        return  # computed on first use
    try:
        cache = FeatureCache(t.frozen_feature_cache)
        if cfg.video is not None:
            from .video.frozen import data_fields

            expected = data_fields(cfg, {k: v for k, v in parts.items() if k in cache.manifest.get("parts", {})})
        else:
            expected = {"model": cfg.model.name, "precision": cfg.model.precision,
                        "data.annotations_sha256": file_sha256(data.train_data)}
            if "image" in cache.manifest.get("parts", {}):
                expected["data.image_root"] = image_root_of(train_captioned(data).images)
        cache.check(expected)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """No log output or warnings from the pre-flight build (the real build repeats them, into
    out.log). The NullHandler also keeps `logging.info` from calling basicConfig(), which would
    leave a second, unformatted stderr handler behind."""
    root, null = logging.getLogger(), logging.NullHandler()
    root.addHandler(null)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        root.removeHandler(null)
