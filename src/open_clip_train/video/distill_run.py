"""A video teacher with its own inputs (frame view, tokens) and the provenance its cache records,
shared by the cache writer (video/extract.py) and the trainer (video/objective.py).

Teacher names: `xclip` (an X-CLIP checkpoint, video/xclip.py) or any model config of the
registry, applied per frame (OpenClipFrameTeacher).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .teacher import VideoTeacher

XCLIP = "xclip"
SLICE = "uniform"  # frames.sample_indices: evenly spaced over the 1-fps frames


@dataclass
class TeacherInputs:
    teacher: VideoTeacher
    preprocess_cfg: Dict[str, Any]  # the teacher's image view (size, mean, std, interpolation, resize mode)
    tokenizer: Callable  # texts -> the teacher's tokens, word-limited as the student's

    def transform(self) -> Callable:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)


def _xclip_inputs(pretrained: str, device, max_words: int) -> TeacherInputs:
    from open_clip import get_tokenizer
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from .dataset import WordLimitedTokenizer
    from .xclip import XClipTeacher

    teacher = XClipTeacher.from_checkpoint(pretrained, device=device)
    if teacher.max_words != max_words:
        raise ValueError(f"the X-CLIP teacher was trained with max_words {teacher.max_words}; pass --max-words "
                         f"{teacher.max_words}")
    size = teacher.clip.visual.image_size
    cfg = {"size": tuple(size) if not isinstance(size, int) else (size, size), "mode": "RGB",
           "mean": OPENAI_DATASET_MEAN, "std": OPENAI_DATASET_STD, "interpolation": "bicubic",
           "resize_mode": "shortest", "fill_color": 0}
    words = WordLimitedTokenizer(get_tokenizer("ViT-B-32"), max_words, max_words)  # CLIP BPE, exactly W tokens
    return TeacherInputs(teacher, cfg, words)


def build_teacher(name: str, pretrained: str, *, max_words: int, device="cpu", precision: str = "fp32",
                  trust_checkpoint: bool = False) -> TeacherInputs:
    """The frozen teacher `name` with weights `pretrained` (ValueError: the user's)."""
    if name == XCLIP:
        return _xclip_inputs(pretrained, device, max_words)
    from ..distill.teacher import Teacher
    from .dataset import WordLimitedTokenizer
    from .teacher import OpenClipFrameTeacher

    image = Teacher.from_pretrained(name, pretrained, device=device, precision=precision,
                                    trust_checkpoint=trust_checkpoint)
    teacher = OpenClipFrameTeacher(image.model, name=name, weights_path=str(pretrained))
    ctx = int(getattr(image.tokenizer, "context_length", 77))
    return TeacherInputs(teacher, dict(image.model.visual.preprocess_cfg),
                         WordLimitedTokenizer(image.tokenizer, max_words, ctx))


def frame_sampling(frames_root: Optional[str]) -> Dict[str, Any]:
    """How the frames were taken: a frame store's own spec, else live decoding's defaults."""
    from .frame_store import read_spec
    from .frames import FrameSpec

    spec = read_spec(frames_root) if frames_root else FrameSpec()
    return {"fps": spec.frames_per_second, "slice": SLICE, "short_side": spec.short_side}


def expected_fields(video, data_root: str, teacher_model: Optional[str]) -> Dict[str, Any]:
    """The manifest fields a training run can check without building the teacher."""
    return {"data": {"root": str(Path(data_root).resolve())},
            "frames": {"sampling": frame_sampling(video.frames_root), "max_frames": video.model.max_frames},
            "text": {"max_words": video.max_words},
            "teacher": {"model": teacher_model}}


def cache_dirs(spec: str) -> List[str]:
    """--teacher-cache DIR[,DIR2,...] -> the directories (one per teacher)."""
    return [d for d in (s.strip() for s in spec.split(",")) if d]


def open_caches(spec: str, video, data_root: str, teacher_models: Sequence[str]):
    """Open, check against this run and check coverage of the training split: ValueError (one
    line) on any mismatch. teacher_models: one name per cache, or one for all."""
    from .msrvtt import train_split
    from .teacher_cache import VideoTeacherCache

    dirs = cache_dirs(spec)
    if len(teacher_models) not in (1, len(dirs)):
        raise ValueError(f"{len(dirs)} teacher caches but {len(teacher_models)} teacher models; give one name "
                         "or one per cache (comma separated)")
    split = train_split(data_root, video.train_split)
    pairs = split.pair_ids()
    caches = []
    for i, d in enumerate(dirs):
        cache = VideoTeacherCache(d)
        cache.check(expected_fields(video, data_root, teacher_models[i if len(teacher_models) > 1 else 0]))
        cache.check_covers(split.video_ids, pairs[:, 1].tolist())
        caches.append(cache)
    return caches


def video_id_map(video, data_root: str) -> Dict[int, str]:
    """The batches' video numbers (column 0 of their ids) -> the split's video ids, as cached."""
    from .msrvtt import train_split, video_numbers

    ids = train_split(data_root, video.train_split).video_ids
    return dict(zip(video_numbers(ids), ids))


def preflight(cfg) -> None:
    """`--dataset-type msrvtt --distill`'s user errors before any model or data is built: the
    teacher's files and name, and each cache's manifest and coverage of the training split."""
    from ..errors import UserError

    d = cfg.objective.distill
    if d.teacher_pretrained and not Path(d.teacher_pretrained).is_file():
        raise UserError(f"--teacher-pretrained {d.teacher_pretrained}: no such file")
    if not cfg.data.train_data:
        raise UserError("--distill with --dataset-type msrvtt needs --train-data (the teacher teaches training)")
    if d.teacher_cache:
        missing = [c for c in cache_dirs(d.teacher_cache) if not Path(c).is_dir()]
        if missing:
            raise UserError(f"--teacher-cache {missing[0]}: no such directory")
        try:
            open_caches(d.teacher_cache, cfg.video, cfg.data.train_data, d.teacher_model.split(","))
        except ValueError as e:
            raise UserError(f"--teacher-cache: {e}") from None
    elif d.teacher_model != XCLIP:
        from ..models import create_model

        try:
            create_model(d.teacher_model, device="meta")
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--teacher-model {d.teacher_model}: {e} (or 'xclip' for an X-CLIP checkpoint)") from None
