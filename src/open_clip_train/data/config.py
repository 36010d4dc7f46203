"""What the flags select about data (`DataCfg`): sources, image roots, caption sampling, batch
size, workers and the bad-sample budget."""
from __future__ import annotations

from dataclasses import dataclass

DATASET_TYPES = ("auto", "coco", "csv", "webdataset", "synthetic", "msrvtt")
CAPTION_SAMPLING = ("all", "random")


@dataclass
class DataCfg:
    dataset_type: str = "auto"  # auto: .json -> coco, .csv/.tsv -> csv, .tar -> webdataset
    train_data: str | None = None
    val_data: str | None = None
    train_image_root: str | None = None  # default: COCO standard layout / CSV paths as written
    val_image_root: str | None = None
    coco_caption_sampling: str = "all"  # all: every pair per epoch; random: one caption per image (video)
    train_num_samples: int | None = None  # caps the epoch (required for webdataset w/o sizes.json)
    val_num_samples: int | None = None  # caps the number of evaluation images
    batch_size: int = 64  # per rank
    workers: int = 0
    seed: int = 0
    csv_separator: str = "\t"
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    dataset_resampled: bool = False  # webdataset: draw shards with replacement
    upsampling_factors: str | None = None  # webdataset 'a::b' sources: shard draw weights 'wa::wb' (resampled)
    max_bad_samples_fraction: float = 0.01  # stop when more of an epoch (or the val set) is bad


    def __post_init__(self) -> None:
        if self.dataset_type not in DATASET_TYPES:
            raise ValueError(f"dataset_type must be one of {DATASET_TYPES}, got {self.dataset_type!r}")
        if self.coco_caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(
                f"coco_caption_sampling must be one of {CAPTION_SAMPLING}, got {self.coco_caption_sampling!r}"
            )
        if self.upsampling_factors is not None and not self.dataset_resampled:
            raise ValueError("upsampling factors weight draws with replacement: they need dataset_resampled")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"need batch_size >= 1 and workers >= 0, got {self.batch_size}, {self.workers}")
        if self.dataset_type == "synthetic" and self.val_data:
            raise ValueError("synthetic data is for training only; unset val_data")
        if not 0 <= self.max_bad_samples_fraction <= 1:
            raise ValueError(f"max_bad_samples_fraction must be in [0, 1], got {self.max_bad_samples_fraction}")
        for name in ("train_num_samples", "val_num_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")
