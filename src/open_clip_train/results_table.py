"""`python -m open_clip_train.results_table RUN_DIR`: print a run's retrieval results per
evaluated epoch as a markdown table (standard COCO protocol, chance level for reference)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

from .run_outputs import read_results

COLUMNS = ["coco_i2t_R@1", "coco_i2t_R@5", "coco_i2t_R@10", "coco_t2i_R@1", "coco_t2i_R@5", "coco_t2i_R@10"]


def table(rows: List[Dict]) -> List[str]:
    head = "| epoch | " + " | ".join(c.replace("coco_", "") for c in COLUMNS) + " | clip_val_loss |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"{100 * r[c]:.1f}%" if c in r else "-" for c in COLUMNS]
        loss = f"{r['clip_val_loss']:.3f}" if "clip_val_loss" in r else "-"
        lines.append(f"| {r.get('epoch', '?')} | " + " | ".join(cells) + f" | {loss} |")
    if rows and "num_images" in rows[-1]:
        n_img = rows[-1]["num_images"]
        lines.append(f"chance level: R@1 ~ {100 / n_img:.1f}%, R@10 ~ {1000 / n_img:.1f}% ({n_img} images)")
    zs = sorted({k for r in rows for k in r if "zeroshot" in k and k.endswith(("-top1", "-top5"))})
    if zs:
        lines += ["", "| epoch | " + " | ".join(zs) + " |", "|" + "---|" * (len(zs) + 1)]
        lines += [f"| {r.get('epoch', '?')} | " + " | ".join(f"{100 * r[k]:.1f}%" if k in r else "-" for k in zs) + " |"
                  for r in rows if any(k in r for k in zs)]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    a = ap.parse_args(argv)
    path = a.run_dir / "checkpoints" / "results.jsonl"
    if not path.exists():
        print(f"error: no results at {path}", file=sys.stderr)
        return 2
    print("\n".join(table(read_results(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
