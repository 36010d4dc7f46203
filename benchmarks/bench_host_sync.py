"""What the training step's host synchronisation costs: our trainer as it is (the step's agreement
read a step later, the failed update dropped on the device by the fused AdamW) against the same run
reading the agreement within its own step (`Trainer.defer_agreement = False`: the host waits for
the step's kernels before it queues the update). Both runs count, per training step, the host reads
of device values our code makes (CPU tensors count too when the device is the CPU) and, on CUDA,
every synchronisation torch reports (`torch.cuda.set_sync_debug_mode("warn")`), by call site.

    python benchmarks/bench_host_sync.py [--device cuda] [--model M] [--batch-size B] [--precision P]
                                         [--steps N] [--out PREFIX]

Synthetic data (no decoding in the way); writes PREFIX.json and PREFIX.md. On CPU the timing
shows nothing (the host runs the kernels itself); the read counts still hold.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("open_clip_train", "open_clip", "transformers", "timm")  # where a read is attributed


def _site(stack) -> str:
    """The innermost frame of the training code (not torch) in a stack summary."""
    for frame in reversed(stack):
        parts = Path(frame.filename).parts
        if "torch" in parts and not any(p in parts for p in OURS):
            continue
        if any(p in parts for p in OURS) or "bench_host_sync" in frame.filename:
            return f"{'/'.join(parts[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


def child(argv: list[str], immediate: bool, report: Path, counted: int) -> int:
    """One training run in this process, reading within the step if `immediate`; the first `counted` steps
    (the untimed interval: the counters slow the host down) count reads and syncs."""
    import warnings

    import torch
    from torch.overrides import TorchFunctionMode

    from open_clip_train import trainer as trainer_module
    from open_clip_train.main import main

    reads, syncs, steps = Counter(), Counter(), [0]
    in_step = [False]

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"item", "tolist", "__float__", "__int__", "__bool__", "cpu"}:
                stack = traceback.extract_stack()[:-1]
                on_host = cuda and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
                # host_prefix_length reads the batch's host tokens by design (models/text_trim.py)
                if not on_host and not any(f.name == "host_prefix_length" for f in stack):
                    reads[_site(stack)] += 1
            return func(*args, **(kwargs or {}))

    trainer_module.Trainer.defer_agreement = not immediate

    original = trainer_module.Trainer.train_step
    cuda = "cuda" in argv

    def train_step(self, batches):
        steps[0] += 1
        if steps[0] > counted:
            if cuda and steps[0] == counted + 1:
                torch.cuda.set_sync_debug_mode(0)
            return original(self, batches)
        in_step[0] = True
        try:
            with Reads():
                return original(self, batches)
        finally:
            in_step[0] = False

    trainer_module.Trainer.train_step = train_step
    if cuda:
        def show(message, category, filename, lineno, file=None, line=None):
            if in_step[0] and "synchroniz" in str(message):
                syncs[_site(traceback.extract_stack()[:-1])] += 1

        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    code = main(argv)
    report.write_text(json.dumps({"steps": steps[0], "counted_steps": min(counted, steps[0]), "reads": dict(reads),
                                  "syncs": dict(syncs) if cuda else None}))
    return code


def run(args, immediate: bool, work: Path) -> dict:
    name = "immediate" if immediate else "as-is"
    report = work / f"{name}.json"
    argv = ["--model", args.model, "--dataset-type", "synthetic", "--train-num-samples", str(args.batch_size * args.steps),
            "--batch-size", str(args.batch_size), "--precision", args.precision, "--epochs", "1",
            "--lr", "5e-4", "--wd", "0.2", "--warmup", "2", "--workers", str(args.workers),
            "--log-every-n-steps", str(args.log_every), "--save-frequency", "0", "--val-frequency", "0",
            "--report-to", "", "--seed", "0", "--log-dir", str(work), "--name", name, "--device", args.device]
    cmd = ([sys.executable, __file__, "--child", report.as_posix(), "--log-every", str(args.log_every)]
           + (["--immediate"] if immediate else []) + ["--"] + argv)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_host_sync: the {name} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    rows = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = rows[1:] or rows  # the first interval holds the warm-up (allocator, cudnn autotune)
    out.update(name=name, wall_s=time.perf_counter() - t0,
               samples_per_second=sum(r["samples_per_second"] for r in timed) / len(timed),
               batch_time=sum(r["batch_time"] for r in timed) / len(timed))
    return out


def per_step(counter: dict | None, steps: int) -> str:
    if counter is None:
        return "n/a (no CUDA)"
    if not counter:
        return "0"
    return f"{sum(counter.values()) / steps:.2f}: " + "; ".join(
        f"{site} x{n / steps:.2f}" for site, n in sorted(counter.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="tiny-convnext-cliptext")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "work" / "host-sync"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--immediate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.rest, args.immediate, Path(args.child), counted=args.log_every)
    if args.steps < 2 * args.log_every:
        p.error("--steps must be at least twice --log-every (the first interval is not timed)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_host_sync: error: --device cuda but torch sees no GPU; run it on a GPU machine", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="host-sync-") as tmp:
        results = [run(args, immediate, Path(tmp)) for immediate in (False, True)]
    as_is, immediate = results
    ratio = as_is["samples_per_second"] / immediate["samples_per_second"]
    meta = {"device": args.device, "model": args.model, "batch_size": args.batch_size, "precision": args.precision,
            "steps": args.steps}
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "runs": results, "as_is_over_immediate": ratio},
                                                     indent=1))
    lines = [f"Host synchronisation per training step: {args.model}, batch {args.batch_size}, {args.precision}, "
             f"{args.device}, {args.steps} steps: the first {args.log_every} count the reads and syncs, the rest "
             "are timed.", "",
             "| run | samples/s | s/step | host reads per step | CUDA syncs per step |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['samples_per_second']:.1f} | {r['batch_time']:.4f} | "
                     f"{per_step(r['reads'], r['counted_steps'])} | {per_step(r['syncs'], r['counted_steps'])} |")
    lines += ["", f"Reading the agreement a step later: {ratio:.3f}x the samples/s of reading it within the "
                  f"step (the wait it saves: {100 * (1 - 1 / ratio):+.1f}% of a step)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
