"""Training and retrieval-evaluation data.

    config       DataCfg (what the flags select)
    loaders      get_data(): the trainer's one entry point; DataInfo, RetrievalData
    datasets     pair / image / synthetic datasets, decoding with substitutes for bad samples
    coco, csv_data, wds   parsing each source format
    sampler      GlobalBatchSampler (world-size invariant, resumable mid-epoch)
    bad_samples, bad_budget   broken inputs: what is bad, and how many a run tolerates
"""
from .bad_samples import BadTally, Batch
from .config import DataCfg
from .datasets import Captioned, ImageDataset, load_rgb
from .loaders import DataInfo, RetrievalData, get_data, load_captioned, resolve_dataset_type, train_captioned
from .sampler import GlobalBatchSampler

__all__ = ["BadTally", "Batch", "Captioned", "DataCfg", "DataInfo", "GlobalBatchSampler", "ImageDataset",
           "RetrievalData", "get_data", "load_captioned", "load_rgb", "resolve_dataset_type", "train_captioned"]
