#!/usr/bin/env python3
"""--frozen-feature-cache: an image-text run with both towers locked and --no-augment, live vs on the
cache (first run: extraction + training; second run: the cache reused).

    python benchmarks/bench_frozen_cache.py [--model convnextv2_tiny_cliptext-512] [--images 48]

Each run is `python -m open_clip_train.main` in a subprocess on the demo COCO data; the per-epoch
speed is the samples/s of the last metrics.jsonl row of each epoch (the trainer's own clock), the
extraction time the cache's own log line. Writes benchmarks/results-frozen-cache.md.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(out: Path, data, name: str, model: str, extra: list) -> dict:
    argv = [sys.executable, "-m", "open_clip_train.main", "--model", model, "--dataset-type", "coco",
            "--train-data", str(data.train_annotations), "--epochs", "2", "--batch-size", "16", "--workers", "2",
            "--precision", "fp32", "--lock-image", "--lock-text", "--no-augment", "--log-every-n-steps", "1",
            "--warmup", "1", "--log-dir", str(out), "--name", name, "--compile-frozen", "off", *extra]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    last = {}
    for r in rows:
        last[r["epoch"]] = r
    log = (out / name / "out.log").read_text()
    m = re.search(r"frozen-feature cache .*computed .* in ([0-9.]+) s", log)
    return {"wall_s": wall, "sps": {e: r["samples_per_second"] for e, r in sorted(last.items())},
            "extract_s": float(m.group(1)) if m else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="convnextv2_tiny_cliptext-512")
    ap.add_argument("--images", type=int, default=48)
    args = ap.parse_args()
    from open_clip_train.demo_data import generate
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "coco", num_train=args.images, num_val=2, image_size=64, seed=0)
        cache = tmp / "cache"
        res = {"live": run(tmp / "logs", data, "live", args.model, []),
               "cached_first": run(tmp / "logs", data, "c1", args.model, ["--frozen-feature-cache", str(cache)]),
               "cached_reuse": run(tmp / "logs", data, "c2", args.model, ["--frozen-feature-cache", str(cache)])}
    pairs = args.images * 5
    lines = [f"# --frozen-feature-cache: {args.model}, both towers locked, --no-augment", "",
             f"Demo COCO data: {args.images} images x 5 captions = {pairs} pairs per epoch, batch 16, fp32, "
             f"2 epochs, 2 loader workers, CPU ({subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} "
             "cores, shared with other work), `--compile-frozen off`. Samples/s: the trainer's last "
             "metrics.jsonl row of each epoch. Upstream's trainer was not run (its virtualenv was not set up "
             "on the measuring machine): ours live vs ours cached only.", "",
             "| run | epoch 0 samples/s | epoch 1 samples/s | extraction s | whole run s |", "|---|---|---|---|---|"]
    for k, r in res.items():
        s = r["sps"]
        ex = "" if r["extract_s"] is None else f"{r['extract_s']:.1f}"
        lines.append(f"| {k} | {s.get(0, float('nan')):.1f} | {s.get(1, float('nan')):.1f} | "
                     f"{ex} | {r['wall_s']:.1f} |")
    speed = res["cached_reuse"]["sps"].get(1, 0) / max(res["live"]["sps"].get(1, 1e-9), 1e-9)
    lines += ["", f"Epoch speed on the cache vs live: {speed:.1f}x.", ""]
    (HERE / "results-frozen-cache.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
