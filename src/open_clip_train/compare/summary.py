"""Retrieval summaries per protocol (every evaluated epoch, the last and the best) and sorting."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .words import as_float, as_int, as_str, global_batch

if TYPE_CHECKING:
    from .runs import Run

KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
# protocol -> direction -> key prefix in results.jsonl
PROTOCOLS: Dict[str, Dict[str, str]] = {
    "coco": {"i2t": "coco_i2t", "t2i": "coco_t2i"},
    "pairwise": {"i2t": "image_to_text", "t2i": "text_to_image"},
    # video runs: V2T in the i2t slot, T2V in the t2i slot (video/metrics.py)
    "msrvtt": {"i2t": "msrvtt_v2t", "t2i": "msrvtt_t2v"},
}
BEST_BY = {
    "mean_r1": "mean of I2T R@1 and T2I R@1",
    "rsum": "sum of I2T and T2I R@1/5/10",
}


def recalls(row: Mapping[str, Any], protocol: str) -> Optional[Dict[str, float]]:
    """{'i2t_r1': 0.0955, ...} for the protocol, or None when the row lacks any of its recalls."""
    out = {}
    for d in DIRECTIONS:
        for k in KS:
            v = as_float(row.get(f"{PROTOCOLS[protocol][d]}_R@{k}"))
            if v is None or math.isnan(v):
                return None
            out[f"{d}_r{k}"] = v
    return out


def _score(r: Mapping[str, float], best_by: str) -> float:
    if best_by == "mean_r1":
        return (r["i2t_r1"] + r["t2i_r1"]) / 2
    if best_by == "rsum":
        return sum(r.values())
    raise ValueError(f"unknown best-by key {best_by!r}; choose from {sorted(BEST_BY)}")


@dataclass
class EpochRecall:
    epoch: int
    recall: Dict[str, float]  # i2t_r1 ... t2i_r10, fractions
    val_loss: Optional[float]


@dataclass
class ProtocolSummary:
    curve: List[EpochRecall]  # every evaluated epoch that has this protocol's recalls
    last: EpochRecall
    best: EpochRecall


def summarize(rows: Sequence[Mapping[str, Any]], protocol: str,
              best_by: str = "mean_r1") -> Optional[ProtocolSummary]:
    curve = []
    for row in rows:
        r = recalls(row, protocol)
        if r is not None:
            curve.append(EpochRecall(int(row["epoch"]), r, as_float(row.get("clip_val_loss"))))
    if not curve:
        return None
    # max of (score, rsum, -epoch): ties go to the higher rsum, then to the earlier epoch
    best = max(curve, key=lambda e: (_score(e.recall, best_by), sum(e.recall.values()), -e.epoch))
    return ProtocolSummary(curve, curve[-1], best)


def _metric_key(protocol: str, which: str, metric: str) -> Callable[[Run], Optional[float]]:
    def get(run: Run) -> Optional[float]:
        s = run.protocols.get(protocol)
        if s is None:
            return None
        rec = getattr(s, which).recall
        return (rec["i2t_r1"] + rec["t2i_r1"]) / 2 if metric == "mean_r1" else rec[metric]
    return get


def sort_keys() -> Dict[str, Tuple[Callable[[Run], Any], bool]]:
    """--sort KEY -> (getter, descending). Strings sort ascending; numbers of the config ascending;
    recalls descending (best first). Recall keys without prefix read the COCO protocol at the last
    epoch; `best_` reads the best epoch; `pw_` / `pw_best_` the pairwise (upstream) metrics."""
    keys: Dict[str, Tuple[Callable[[Run], Any], bool]] = {
        "name": (lambda r: r.name, False),
        "model": (lambda r: as_str(r.settings.get("model")), False),
        "lr": (lambda r: as_float(r.settings.get("lr")), False),
        "epochs": (lambda r: as_int(r.settings.get("epochs")), False),
        "warmup": (lambda r: as_int(r.settings.get("warmup")), False),
        "global_batch": (lambda r: (global_batch(r.settings) or (None,) * 4)[3], False),
        "trainable": (lambda r: r.log.init_counts["total"] if r.log and r.log.init_counts else None, False),
    }
    metrics = [f"{d}_r{k}" for d in DIRECTIONS for k in KS] + ["mean_r1"]
    for prefix, protocol in (("", "coco"), ("pw_", "pairwise")):
        for m in metrics:
            keys[f"{prefix}{m}"] = (_metric_key(protocol, "last", m), True)
            keys[f"{prefix}best_{m}"] = (_metric_key(protocol, "best", m), True)
    return keys


def sort_runs(runs: List[Run], key: str) -> List[Run]:
    """Stable sort by KEY; runs without a value go last, in their given order."""
    getter, descending = sort_keys()[key]
    have = [r for r in runs if getter(r) is not None]
    missing = [r for r in runs if getter(r) is None]
    try:
        have.sort(key=getter, reverse=descending)
    except TypeError:  # mixed types in one params key: compare as text
        have.sort(key=lambda r: str(getter(r)), reverse=descending)
    return have + missing
