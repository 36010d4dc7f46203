"""The comparison report as markdown: the runs' configurations, then one table per protocol."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .runs import LogInfo, Run
from .summary import BEST_BY, KS
from .words import as_float, as_int, as_str, fmt_lr, freeze_in_words, global_batch, plural, teacher_words, text_tower

PROTOCOL_TITLES = {
    "coco": "COCO protocol (`coco_*` keys: every caption of an image counts as a match)",
    "pairwise": "Pairwise (upstream) metrics; not comparable to COCO protocol",
    "msrvtt": "MSR-VTT video-text retrieval (`msrvtt_*` keys: V2T in the I2T columns' place, T2V in T2I's)",
}
PAIRWISE_EXPLAINED = ("`image_to_text_*` / `text_to_image_*` keys: upstream's pairwise retrieval over "
                      "(image, caption) pairs, where an image's other captions count as negatives, so "
                      "R@1 is capped near 1/captions-per-image. Use it to compare with upstream OpenCLIP runs only.")


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    return [_row(head), "| " + " | ".join("---" for _ in head) + " |"] + [_row(r) for r in rows]


def _pct3(rec: Mapping[str, float], d: str) -> str:
    return "/".join(f"{100 * rec[f'{d}_r{k}']:.2f}%" for k in KS)


def _counts(log: Optional[LogInfo]) -> str:
    if log is None or log.init_counts is None:
        return "-"
    c = log.init_counts
    video = f" / video {c['video']:,}" if "video" in c else ""
    return f"{c['total']:,} ({c['visual']:,} / {c['text']:,}{video})"


def config_row(run: Run) -> List[str]:
    s = run.settings
    if not s:
        return [run.name] + ["-"] * 7 + [_counts(run.log)]
    lr, epochs = as_float(s.get("lr")), as_int(s.get("epochs"))
    gb = global_batch(s)
    warmup = as_int(s.get("warmup"))
    return [
        run.name,
        as_str(s.get("model")) or "-",
        text_tower(s),
        freeze_in_words(s),
        teacher_words(s),
        f"{fmt_lr(lr)} / {epochs if epochs is not None else '-'}",
        warmup if warmup is not None else "-",
        f"{gb[0]} x {gb[1]} x {gb[2]} = {gb[3]}" if gb else "-",
        _counts(run.log),
    ]


CONFIG_HEAD = ["run", "model", "text tower", "freeze / unfreeze", "distill / headalign", "lr / epochs", "warmup",
               "batch x world x accum = global", "trainable @INIT: total (visual / text)"]
METRIC_HEAD = ["run", "last epoch", "I2T R@1/5/10", "T2I R@1/5/10", "best epoch", "I2T R@1/5/10 (best)",
               "T2I R@1/5/10 (best)", "clip_val_loss (last)"]
VIDEO_HEAD = [h.replace("I2T", "V2T").replace("T2I", "T2V") for h in METRIC_HEAD]


def metric_row(run: Run, protocol: str) -> List[str]:
    s = run.protocols.get(protocol)
    if s is None:
        if not run.results.rows:
            why = "no results.jsonl" if run.results.path is None else "no readable results"
        elif protocol == "coco" and run.protocols.get("pairwise") is not None:
            why = "n/a: upstream run, pairwise (upstream) metrics only"
        elif protocol != "msrvtt" and run.protocols.get("msrvtt") is not None:
            why = "n/a: video run, see the MSR-VTT table"
        else:
            key = {"coco": "coco_*", "pairwise": "image_to_text_*", "msrvtt": "msrvtt_*"}[protocol]
            why = f"n/a: no {key} recalls"
        return [run.name, f"({why})"] + ["-"] * (len(METRIC_HEAD) - 2)
    last, best = s.last, s.best
    last_epoch = f"{last.epoch} (see notes)" if run.results.notes else last.epoch
    loss = f"{last.val_loss:.4f}" if last.val_loss is not None else "-"
    return [run.name, last_epoch, _pct3(last.recall, "i2t"), _pct3(last.recall, "t2i"),
            best.epoch, _pct3(best.recall, "i2t"), _pct3(best.recall, "t2i"), loss]


ZEROSHOT_KEY = re.compile(r"^(imagenet(v2)?-zeroshot-val|zeroshot-.+)-top[15]$")
ZEROSHOT_TITLE = "Zero-shot classification (last epoch evaluated with it)"


def zeroshot_last(rows: Sequence[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The last row with zero-shot keys, reduced to its epoch and those keys; None without any."""
    for row in reversed(rows):
        found = {k: v for k, v in row.items() if ZEROSHOT_KEY.match(k)}
        if found:
            return dict(found, epoch=row.get("epoch", "?"))
    return None


def zeroshot_table(runs: Sequence[Run]) -> List[str]:
    """Upstream's top-1/top-5 keys (and --zeroshot-data's) as percentages; [] when no run has any."""
    last = {r.name: zeroshot_last(r.results.rows) for r in runs}
    keys = sorted({k for v in last.values() if v for k in v if k != "epoch"})
    if not keys:
        return []
    rows = [[name, v["epoch"]] + [f"{100 * v[k]:.2f}%" if k in v else "-" for k in keys] if v
            else [name, "(no zero-shot results)"] + ["-"] * len(keys) for name, v in last.items()]
    return ["", f"## {ZEROSHOT_TITLE}", ""] + _table(["run", "epoch"] + keys, rows)


def render(runs: Sequence[Run], best_by: str = "mean_r1", sort: Optional[str] = None,
           warnings: Sequence[str] = ()) -> str:
    lines = [f"# Run comparison ({plural(len(runs), 'run')}" + (f", sorted by {sort})" if sort else ")"), ""]
    lines += ["## Runs", ""]
    lines += _table(CONFIG_HEAD, [config_row(r) for r in runs])
    lines += ["", "Freeze: unlock epochs count completed epochs (the unlock applies from the start of that epoch); "
              "groups/layers are the last N of the tower. Trainable counts are from out.log's INIT line.", ""]
    best_note = (f"Recalls as percentages. `last` = the last evaluated epoch; `best` = the epoch with the highest "
                 f"{BEST_BY[best_by]} (ties: higher sum of all six recalls, then the earlier epoch), "
                 "chosen within each protocol.")
    lines += [f"## {PROTOCOL_TITLES['coco']}", "", best_note, ""]
    lines += _table(METRIC_HEAD, [metric_row(r, "coco") for r in runs])
    lines += ["", f"## {PROTOCOL_TITLES['pairwise']}", "", PAIRWISE_EXPLAINED, ""]
    lines += _table(METRIC_HEAD, [metric_row(r, "pairwise") for r in runs])
    lines += zeroshot_table(runs)
    if any(r.protocols.get("msrvtt") is not None for r in runs):
        lines += ["", f"## {PROTOCOL_TITLES['msrvtt']}", "", best_note, ""]
        lines += _table(VIDEO_HEAD, [metric_row(r, "msrvtt") for r in runs])
    notes = list(warnings) + [f"{r.name}: {n}" for r in runs for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
