"""scripts/gpu_check.sh: without CUDA it fails at once, loudly, and touches nothing; the commands
it would run are valid command lines of this trainer."""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from open_clip_train.params import parse_args

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
RESULTS = REPO / "benchmarks" / "results-gpu.md"


def _run(tmp_path, path_prefix=None, *args):
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - t0


def _assert_refused(proc, elapsed, tmp_path, before, want):
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error:") and want in err[0], proc.stderr
    assert elapsed < 60
    assert not (tmp_path / "work").exists()  # no work started
    assert RESULTS.read_text() == before  # the placeholder stays


def test_fails_loudly_without_a_driver(tmp_path):
    before = RESULTS.read_text()
    bin_dir = tmp_path / "bin"  # a PATH with no nvidia-smi: keep only the tools the script uses
    bin_dir.mkdir()
    for tool in ("dirname", "date", "env", "mkdir", "timeout", "grep", "sed", "cut", "tail", "rm", "chmod"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found:
            (bin_dir / tool).symlink_to(found)
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable, PATH=str(bin_dir))
    t0 = time.perf_counter()
    proc = subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    _assert_refused(proc, time.perf_counter() - t0, tmp_path, before, "nvidia-smi not found")


def test_fails_loudly_when_torch_sees_no_cuda(tmp_path):
    """A driver tool on PATH but no usable GPU (here: CUDA_VISIBLE_DEVICES='')."""
    before = RESULTS.read_text()
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    proc, elapsed = _run(tmp_path, fake.parent)
    _assert_refused(proc, elapsed, tmp_path, before, "torch.cuda.is_available() is False")


def test_placeholder_says_not_run():
    assert "Not run yet" in RESULTS.read_text()


def _plan(tmp_path):
    proc, _ = _run(tmp_path, None, "--plan")
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def test_plan_trainer_commands_parse(tmp_path):
    plan = _plan(tmp_path)
    assert len(plan) == 6
    mains = [c[c.index("open_clip_train.main") + 1:] for c in plan if "open_clip_train.main" in c]
    assert len(mains) == 3
    for argv in mains:
        args = parse_args(argv)
        assert args.precision == "amp" and args.device == "cuda"
    assert parse_args(mains[2]).torchcompile
    assert "--nproc_per_node" in plan[2] and parse_args(mains[1]).dist_backend == "nccl"
    assert not (tmp_path / "work").exists()


def test_plan_benchmark_command_parses(tmp_path):
    bench = next(c for c in _plan(tmp_path) if c[1].endswith("bench_train.py"))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), *bench[2:], "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert all(flag in proc.stdout for flag in ("--device", "--batch-size", "--precision"))


def test_benchmark_refuses_cuda_without_a_gpu(tmp_path):
    """--device cuda on a machine where torch sees no GPU: one error line, exit 2, no CPU figures."""
    upstream = tmp_path / "upstream" / "bin"
    upstream.mkdir(parents=True)
    (upstream / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # never reached
    (upstream / "python").chmod(0o755)
    out = tmp_path / "res"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OURS_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--tiny", "--device", "cuda",
                           "--upstream-venv", str(upstream.parent), "--work-dir", str(tmp_path / "work"),
                           "--out", str(out), "--max-wait", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device cuda but torch sees no GPU" in proc.stderr
    assert not out.with_suffix(".md").exists() and not (tmp_path / "work" / "runs").exists()


def test_plan_host_sync_command_parses_and_refuses_cuda_without_a_gpu(tmp_path):
    sync = next(c for c in _plan(tmp_path) if c[1].endswith("bench_host_sync.py"))
    assert sync[sync.index("--device") + 1] == "cuda" and sync[sync.index("--batch-size") + 1] == "128"
    out = tmp_path / "hs"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_host_sync.py"),
                           *[a if a != str(tmp_path / "work" / "host-sync") else str(out) for a in sync[2:]]],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 2 and "--device cuda but torch sees no GPU" in proc.stderr, proc.stderr[-2000:]
    assert not out.with_suffix(".md").exists()


def test_benchmark_interpreters_pick_ours_and_upstreams_trainer(tmp_path):
    """The shims gpu_check.sh hands the benchmark (it clears PYTHONPATH for its children): ours
    imports this checkout's open_clip_train, upstream's open_clip_torch's copy, from the same
    interpreter and packages, whether the checkout is installed editable or only on PYTHONPATH."""
    shims = tmp_path / "shims"
    env = dict(os.environ, GPU_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable, GPU_CHECK_PLAN_SHIMS=str(shims))
    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    def trainer_of(python):
        code = "import open_clip, open_clip_train, torch; print(open_clip_train.__file__)"
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=clean, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return Path(out.stdout.strip()).resolve()

    ours, upstream = trainer_of(shims / "ours" / "bin" / "python"), trainer_of(shims / "upstream" / "bin" / "python")
    assert ours == (REPO / "src" / "open_clip_train" / "__init__.py").resolve()
    assert not upstream.is_relative_to(REPO / "src") and (upstream.parent.parent / "open_clip" / "__init__.py").is_file()
