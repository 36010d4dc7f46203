"""Typed run configuration. The CLI edge maps argparse's Namespace onto these dataclasses exactly
once (`cli_config.config_from_args`); nothing below `main` reads the Namespace."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from .data import DataCfg
from .freeze import FreezeCfg
from .losses import LossCfg
from .model_overrides import ModelOverrides
from .objective import ObjectiveCfg
from .optim import OptimCfg
from .remote_sync import RemoteSyncCfg
from .zeroshot import ZeroShotCfg
from .video.training import VideoCfg


@dataclass(frozen=True)
class ModelCfg:
    name: str
    pretrained: Optional[str] = None
    pretrained_image: bool = False
    pretrained_image_path: Optional[str] = None
    pretrained_text_path: Optional[str] = None
    text_tokenizer: Optional[str] = None
    precision: str = "amp"
    grad_checkpointing: bool = False
    torchcompile: bool = False
    compile_frozen: str = "auto"  # auto | on | off (frozen_compile)
    trim_text_padding: bool = True  # models.text_trim
    overrides: ModelOverrides = field(default_factory=ModelOverrides)  # upstream's --force-*, --image-*, --aug-cfg


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 32
    batch_size: int = 64
    accum_freq: int = 1
    grad_clip_norm: Optional[float] = None
    lr_scheduler: str = "cosine"
    warmup: int = 10000
    epochs_cooldown: Optional[int] = None
    lr_cooldown_power: float = 1.0
    lr_cooldown_end: float = 0.0
    skip_scheduler: bool = False
    seed: int = 0
    log_every_n_steps: int = 100
    no_augment: bool = False
    frozen_feature_cache: Optional[str] = None  # frozen_features.py
    skip_nonfinite_steps: int = 0  # optimizer steps with a non-finite loss/gradient skipped before stopping


@dataclass(frozen=True)
class EvalCfg:
    val_frequency: int = 1
    val_at_start: bool = False
    chunk_size: int = 1024


@dataclass(frozen=True)
class OutputCfg:
    logs: str = "./logs/"
    name: Optional[str] = None
    report_to: Tuple[str, ...] = ()
    wandb_project_name: str = "open-clip"
    wandb_notes: str = ""
    save_frequency: int = 1
    save_most_recent: bool = False
    delete_previous_checkpoint: bool = False
    save_every_n_steps: int = 0  # mid-epoch checkpoints (0: epoch ends only)
    resume: Optional[str] = None
    debug: bool = False
    copy_codebase: bool = False  # provenance_code.record_code into the run directory
    remote_sync: RemoteSyncCfg = RemoteSyncCfg()  # --remote-sync*: copy the run directory away while training
    log_local: bool = False  # --log-local: each node's local rank 0 also writes out-<rank>, as upstream


@dataclass(frozen=True)
class DistCfg:
    backend: Optional[str] = None
    device: str = "auto"
    ddp_static_graph: bool = False
    use_bn_sync: bool = False  # --use-bn-sync: BatchNorm -> SyncBatchNorm under DDP, as upstream


@dataclass(frozen=True)
class RunCfg:
    model: ModelCfg
    data: DataCfg
    train: TrainCfg
    optim: OptimCfg
    loss: LossCfg
    freeze: FreezeCfg
    eval: EvalCfg
    output: OutputCfg
    dist: DistCfg
    objective: ObjectiveCfg
    zeroshot: ZeroShotCfg = field(default_factory=ZeroShotCfg)
    dry_run: bool = False
    trust_checkpoint: bool = False
    malloc_retain: bool = True
    video: Optional[VideoCfg] = None  # --dataset-type msrvtt: video-text training (video/training.py)
    settings: Dict[str, Any] = field(default_factory=dict)  # every resolved flag, for params.txt
