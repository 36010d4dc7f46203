#!/usr/bin/env python3
"""Distillation step throughput and peak memory: upstream's --distill-model vs ours (live teacher,
shared trunk, teacher cache), on the seed's Part B recipe scaled to CPU.

    python benchmarks/bench_distill.py           # convnextv2_tiny pair, batch 16, ~20 min on 2 idle cores
    python benchmarks/bench_distill.py --tiny    # tiny-convnext-cliptext pair, smoke check (~3 min)

The recipe: a linear-head teacher (`convnextv2_tiny_cliptext-512-linear`, the convnext_base_w role)
and an attention-pool student (`convnextv2_tiny_cliptext-512`, the convnext_base_w_absattn role)
whose trunk and text tower hold the teacher's weights; the student's image and text towers are
locked (--lock-image --lock-text), so only its new head trains. Four settings, same data, flags
and student weights:

  upstream  upstream's trainer, --distill-model/--distill-pretrained (full teacher forward per step)
  live      ours, --no-teacher-share (full teacher forward per step, like upstream)
  shared    ours, default: the teacher reuses the student's frozen trunk and text features
  cache     ours, --teacher-cache (embeddings from extract_teacher, run once; no teacher built)

Runs alternate (A B C D, D C B A, ...), medians reported; the measurement is bench_train.measure
(driver clock over steps skip+1..n, CPU-s/step of the trainer's tree, other load, ru_maxrss).
Writes benchmarks/results-distill.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402  (the shared measurement helpers)
    BENCH, DEFAULT_WORK, REPO, RunResult, _median, child_env, machine_info, make_data, measure, ours_python, probe,
    upstream_model_dir, upstream_python, wait_for_quiet, other_load,
)

SETTINGS = ("upstream", "live", "shared", "cache")


@dataclass
class Profile:
    student: str
    teacher: str
    image_size: int
    batch_size: int
    steps: int
    skip: int
    repeats: int
    workers: int = 1
    precision: str = "fp32"
    # Both trainers are told the seed's run length and stopped after `steps`: a run's defaults (ours:
    # whether the frozen trunk is worth compiling) see a real run, not the few steps measured.
    epochs: int = 20


PROFILES = {
    # ~3.5 s/step (upstream) on 2 idle cores; the trunk and the 12-layer text tower dominate the
    # step, as convnext_base_w's do in the seed, so what the teacher does not recompute shows.
    # skip=5: ours times its frozen trunk on steps 1-3 and compiles it (when that pays) in step 4.
    "default": Profile("convnextv2_tiny_cliptext-512", "convnextv2_tiny_cliptext-512-linear", 224, 16,
                       steps=12, skip=5, repeats=2),
    # overhead-dominated (a step is a few ms of compute): only checks the driver end to end
    "tiny": Profile("tiny-convnext-cliptext", "tiny-convnext-cliptext-linear", 64, 32, steps=30, skip=5, repeats=2),
}

WEIGHTS = r"""
import sys, torch
import open_clip_train.models
from open_clip_train.models import create_model
student_name, teacher_name, student_out, teacher_out = sys.argv[1:5]
torch.manual_seed(0)
teacher, _ = create_model(teacher_name)
torch.manual_seed(1)
student, _ = create_model(student_name)
t_sd, s_sd = teacher.state_dict(), student.state_dict()
shared = [k for k in s_sd if k in t_sd and s_sd[k].shape == t_sd[k].shape]
s_sd.update({k: t_sd[k] for k in shared})  # the student starts from the teacher's trunk and text tower
torch.save(t_sd, teacher_out)
torch.save(s_sd, student_out)
print(f"WEIGHTS {len(shared)} of {len(s_sd)} student tensors from the teacher")
"""


def prepare(work: Path, py: Path, prof: Profile) -> dict:
    """Data (TSV), both trainers' model dirs with weights (upstream loads them from its local-dir)."""
    n = prof.batch_size * prof.steps
    tsv_all = make_data(work, py, n, prof.image_size)
    rows = tsv_all.read_text().splitlines()
    tsv = tsv_all.with_name(f"train-{n}.tsv")
    tsv.write_text("\n".join(rows[: n + 1]) + "\n")
    s_dir, t_dir = upstream_model_dir(work, prof.student), upstream_model_dir(work, prof.teacher)
    s_w, t_w = s_dir / "open_clip_pytorch_model.bin", t_dir / "open_clip_pytorch_model.bin"
    if not (s_w.exists() and t_w.exists()):
        out = subprocess.run([str(py), "-c", WEIGHTS, prof.student, prof.teacher, str(s_w), str(t_w)],
                             capture_output=True, text=True, env=child_env(), check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return {"tsv": tsv, "student_dir": s_dir, "teacher_dir": t_dir, "student_w": s_w, "teacher_w": t_w}


def common_args(py: Path, student: str, tsv: Path, prof: Profile, name: str) -> list[str]:
    return [
        str(py), "-m", "open_clip_train.main", "--model", student,
        "--dataset-type", "csv", "--train-data", str(tsv),
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
        "--batch-size", str(prof.batch_size), "--precision", prof.precision, "--epochs", str(prof.epochs),
        "--lr", "5e-4", "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8", "--wd", "0.2", "--warmup", "2",
        "--workers", str(prof.workers), "--log-every-n-steps", "1", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--seed", "0",
        # upstream asserts --lock-text-freeze-layer-norm for a CLIP text tower (whole tower locked either way)
        "--lock-image", "--lock-text", "--lock-text-freeze-layer-norm", "--name", name, "--logs", "none",
    ]


def setting_args(setting: str, ours: Path, upstream: Path, files: dict, cache: Path, prof: Profile,
                 name: str) -> list[str]:
    if setting == "upstream":
        return common_args(upstream, f"local-dir:{files['student_dir']}", files["tsv"], prof, name) + [
            "--distill-model", f"local-dir:{files['teacher_dir']}", "--distill-pretrained", str(files["teacher_w"])]
    args = common_args(ours, prof.student, files["tsv"], prof, name) + [
        "--pretrained", str(files["student_w"]), "--distill", "--teacher-model", prof.teacher,
        "--teacher-pretrained", str(files["teacher_w"])]
    if setting == "live":
        args.append("--no-teacher-share")
    elif setting == "cache":
        args += ["--teacher-cache", str(cache)]
    return args


def extract(ours: Path, files: dict, prof: Profile, out: Path) -> dict:
    """Run extract_teacher once over the training TSV; its time is reported, not in the step figures."""
    if out.exists():
        import shutil
        shutil.rmtree(out)
    cmd = [str(ours), "-m", "open_clip_train.extract_teacher", "--teacher-model", prof.teacher,
           "--teacher-pretrained", str(files["teacher_w"]), "--train-data", str(files["tsv"]),
           "--out", str(out), "--batch-size", str(prof.batch_size), "--workers", str(prof.workers),
           "--precision", prof.precision]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"extraction failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    n = prof.batch_size * prof.steps
    return {"wall_s": round(wall, 1), "images": n, "captions": n, "images_per_s": round(n / wall, 2),
            "bytes": sum(p.stat().st_size for p in out.iterdir())}


def summarise(runs: list[RunResult], prof: Profile) -> list[dict]:
    rows = []
    for setting in SETTINGS:
        rs = [r for r in runs if r.setting == setting]
        rows.append({
            "setting": setting, "runs": len(rs),
            "samples_per_s": _median([r.samples_per_s for r in rs]),
            "samples_per_s_all": [round(r.samples_per_s, 3) for r in rs if r.samples_per_s],
            "samples_per_s_median_step": _median([r.samples_per_s_median_step for r in rs]),
            "cpu_s_per_step": _median([r.cpu_s_per_step for r in rs]),
            "samples_per_cpu_s": _median([prof.batch_size / r.cpu_s_per_step for r in rs if r.cpu_s_per_step]),
            "peak_rss_mib": _median([r.peak_rss_mib for r in rs]),
            "peak_tree_rss_mib": _median([r.peak_tree_rss_mib for r in rs]),
            "startup_s": _median([r.startup_s for r in rs]),
            "other_load_cores_max": max((r.other_load_cores or 0.0) for r in rs) if rs else None,
        })
    base = rows[0]
    for r in rows:
        r["vs_upstream"] = {k: (r[k] / base[k] if r[k] and base[k] else None)
                            for k in ("samples_per_s", "samples_per_s_median_step", "samples_per_cpu_s",
                                      "peak_rss_mib")}
    return rows


def write_markdown(path: Path, meta: dict, rows: list[dict], runs: list[RunResult]) -> None:
    f = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    m, c, e = meta["machine"], meta["config"], meta["extraction"]
    out = [
        "# Distillation throughput: upstream --distill-model vs ours (live, shared trunk, cache)",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"* Machine: {m['cpu_model']}, {m['usable_cores']} cores, {m['mem_gib']} GiB RAM; torch "
        f"{meta['ours']['torch']}, open_clip {meta['ours']['open_clip']} (both venvs)",
        f"* Student `{c['student']}` (attention pool) loading the trunk and text tower of teacher `{c['teacher']}` "
        f"(linear head), both locked (`--lock-image --lock-text`): only the student's head trains. "
        f"{c['image_size']} px, batch {c['batch_size']}, {c['precision']}, {c['workers']} dataloader worker, "
        f"1 process, CSV data, random train augmentation (both trainers' default).",
        f"* Each run is launched for {c['epochs']} epochs (the seed's distill length) and stopped after "
        f"{c['steps']} steps, throughput over steps {c['skip'] + 1}..{c['steps']} (driver clock); "
        f"{c['repeats']} runs per setting, order alternating; medians.",
        f"* Extraction (`extract_teacher`, once, not in the step figures): {e['images']} images + "
        f"{e['captions']} captions in {e['wall_s']} s ({e['images_per_s']} images/s incl. start-up), "
        f"cache {e['bytes'] / 2**10:.0f} KiB.",
        "",
        "| setting | samples/s | vs upstream | samples/s (median step) | CPU-s/step | samples/CPU-s | vs upstream "
        "| peak RSS MiB | vs upstream | other load (max, cores) | all runs samples/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        q = r["vs_upstream"]
        out.append(f"| {r['setting']} | {f(r['samples_per_s'])} | x{f(q['samples_per_s'])} | "
                   f"{f(r['samples_per_s_median_step'])} | {f(r['cpu_s_per_step'])} | {f(r['samples_per_cpu_s'])} | "
                   f"x{f(q['samples_per_cpu_s'])} | {f(r['peak_rss_mib'], 0)} | x{f(q['peak_rss_mib'], 3)} | "
                   f"{f(r['other_load_cores_max'])} | {', '.join(f'{v:.2f}' for v in r['samples_per_s_all'])} |")
    out += ["", "Targets: " + "; ".join(meta["targets"])]
    if meta.get("notes"):
        out += ["", "Notes:", ""] + [f"* {n}" for n in meta["notes"]]
    out += ["", "Run order: " + ", ".join(f"{r.setting}#{r.repeat}" for r in sorted(runs, key=lambda r: r.order)),
            "", "Per-run details are in `results-distill.json`.", ""]
    path.write_text("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models, smoke check (writes results-distill-tiny.*)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--max-wait", type=float, default=60.0)
    ap.add_argument("--upstream-venv", default=None)
    ap.add_argument("--work-dir", default=str(DEFAULT_WORK))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    prof = PROFILES["tiny" if a.tiny else "default"]
    prof.repeats = a.repeats or prof.repeats
    prof.steps = a.steps or prof.steps
    prof.batch_size = a.batch_size or prof.batch_size
    if prof.steps < prof.skip + 2:
        ap.error(f"--steps must be >= {prof.skip + 2}")
    base = Path(a.out) if a.out else BENCH / ("results-distill-tiny" if a.tiny else "results-distill")
    work = Path(a.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ours, upstream = ours_python(), upstream_python(a.upstream_venv)
    ours_info = probe(ours)
    up_info = probe(upstream)
    files = prepare(work, ours, prof)
    cache = work / f"teacher-cache-{prof.teacher}"
    print("extracting the teacher cache ...", flush=True)
    extraction = extract(ours, files, prof, cache)
    print(f"  {extraction}", flush=True)

    runs: list[RunResult] = []
    order = 0
    t_start = time.perf_counter()
    for rep in range(prof.repeats):
        seq = SETTINGS if rep % 2 == 0 else tuple(reversed(SETTINGS))
        for setting in seq:
            load, waited = wait_for_quiet(a.quiet_threshold, a.max_wait) if a.max_wait > 0 else (other_load(), 0.0)
            name = f"distill-{setting}-r{rep}"
            run_dir = work / "runs" / name
            if run_dir.exists():
                import shutil
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            args = setting_args(setting, ours, upstream, files, cache, prof, name)
            print(f"[{time.perf_counter() - t_start:6.0f}s] {setting} #{rep} (other load {load:.2f}) ...", flush=True)
            r = measure(args, run_dir, "upstream" if setting == "upstream" else "ours", setting, rep, order,
                        prof.steps, prof.batch_size, prof.skip, stop_after=True)
            r.load_before_cores, r.waited_s = round(load, 2), round(waited, 1)
            order += 1
            runs.append(r)
            print(f"         {r.samples_per_s:.2f} samples/s, {r.cpu_s_per_step:.2f} CPU-s/step, peak RSS "
                  f"{r.peak_rss_mib:.0f} MiB, other load {r.other_load_cores:.2f}", flush=True)
            log = (run_dir / "stdout.log").read_text()
            if setting == "shared" and "teacher image_trunk: shared with the student" not in log:
                sys.exit(f"{run_dir}: the shared-trunk setting did not share the trunk")
            if setting == "live" and "teacher image_trunk: computed" not in log:
                sys.exit(f"{run_dir}: the live setting shared the trunk")
    rows = summarise(runs, prof)
    by = {r["setting"]: r for r in rows}
    best = max(by["shared"]["vs_upstream"]["samples_per_s"] or 0, by["cache"]["vs_upstream"]["samples_per_s"] or 0)
    best_cpu = max(by["shared"]["vs_upstream"]["samples_per_cpu_s"] or 0,
                   by["cache"]["vs_upstream"]["samples_per_cpu_s"] or 0)
    mem_ok = (by["cache"]["peak_rss_mib"] or 0) < (by["live"]["peak_rss_mib"] or 0)
    targets = [
        f"shared trunk or cache >= 1.8x upstream's samples/s: {'met' if best >= 1.8 else 'MISSED'} "
        f"(best x{best:.2f}; by CPU-s/step x{best_cpu:.2f})",
        f"cache peak RSS below the live teacher's: {'met' if mem_ok else 'MISSED'} "
        f"({by['cache']['peak_rss_mib']:.0f} vs {by['live']['peak_rss_mib']:.0f} MiB)",
    ]
    notes = []
    noisy = [r for r in runs if (r.other_load_cores or 0) > 0.25]
    if noisy:
        notes.append(f"{len(noisy)} of {len(runs)} runs shared the CPU with other processes (up to "
                     f"{max(r.other_load_cores for r in noisy):.2f} cores elsewhere during the window): their "
                     "wall-clock samples/s is pessimistic; samples/CPU-s is the steadier comparison")
    meta = {
        "command": "python benchmarks/bench_distill.py" + "".join(f" {x}" for x in (argv or sys.argv[1:])),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "ours": ours_info, "upstream": up_info, "config": asdict(prof),
        "extraction": extraction, "targets": targets, "notes": notes,
        "total_benchmark_s": round(time.perf_counter() - t_start, 1),
    }
    for info in (meta["ours"], meta["upstream"]):
        p = Path(info["trainer"]).parent
        info["trainer"] = str(p.relative_to(REPO)) if p.is_relative_to(REPO) else "site-packages/open_clip_train"
    base.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "summary": rows, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
    write_markdown(base.with_suffix(".md"), meta, rows, runs)
    print(f"\nwrote {base.with_suffix('.md')}")
    for t in targets:
        print("  " + t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
