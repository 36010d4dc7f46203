"""Distillation: a frozen teacher (live or cached) and the losses that pull the student toward it.

    teacher     the frozen teacher model and its per-batch forward (TeacherRunner)
    sharing     which teacher parts the student's frozen towers can stand in for (plan_sharing)
    capture     the student's trunk features from its ordinary forward (TrunkCapture)
    tokenizers  student and teacher token streams of one batch (TokenizerPair)
    losses      DistillLoss (contrastive + KL to the teacher), the accumulation inputs
    headalign   the new image head pulled toward the checkpoint's own head
    cache       teacher embeddings written once, read per step (TeacherCache, CachedTeacher)
    extract     `python -m open_clip_train.extract_teacher`: writes a cache


"""
from .capture import TrunkCapture, clear_capture
from .losses import DistillCfg, DistillLoss, Outputs, concat_outputs, kl_rows, merge_micro_batch
from .tokenizers import TokenizerPair

__all__ = ["DistillCfg", "DistillLoss", "Outputs", "TokenizerPair", "TrunkCapture", "clear_capture", "concat_outputs",
           "kl_rows", "merge_micro_batch"]
