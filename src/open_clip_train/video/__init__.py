"""Video-text retrieval (MSR-VTT): library parts, importable without the trainer.

msrvtt (annotations -> VideoCaptions), frames (sampling, PyAV decoding, padding), frame_store
(one-time extracted frames; LiveFrames / StoredFrames sources), dataset (training and evaluation
data), pooling (mean / seqtransf / afa), model (attach_video: the VideoCLIP methods), metrics
(T2V / V2T ranks and results.jsonl keys), evaluation (across ranks), demo (synthetic clips).

TeachCLIP distillation: distill_loss (ground truth + coarse + fine terms), teacher (the video
teacher interface, per-frame open_clip teacher), xclip (an X-CLIP checkpoint as a teacher),
teacher_cache (pre-extracted teacher features), feature_cache (frozen-encoder outputs), frozen
(--frozen-feature-cache per frame and caption).
"""
from .frames import BadVideo, FrameSpec
from .metrics import format_seed, video_retrieval_metrics
from .model import VIDEO_PREFIX, VideoModelCfg, attach_video
from .msrvtt import VideoCaptions

__all__ = ["BadVideo", "FrameSpec", "VIDEO_PREFIX", "VideoCaptions", "VideoModelCfg", "attach_video",
           "format_seed", "video_retrieval_metrics"]
