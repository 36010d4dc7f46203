"""Multi-node launches simulated on one CPU machine (gloo), both ways the sbatch scripts launch:

* torchrun per node: two `torchrun --nnodes 2 --node-rank 0|1 --nproc_per_node 1` on localhost,
  each acting as one node. The SLURM variables of `srun` running torchrun once per node are
  set too, with a node list that does not resolve: torchrun's variables must win.
* srun, one task per GPU: two plain Python processes with the SLURM_* variables srun gives its
  tasks and no torchrun variable; the rendezvous comes from SLURM_JOB_NODELIST (localhost) and
  the port derived from SLURM_JOB_ID.

Each rank dumps its final weights from a tiny launcher script wrapping `Trainer.close` (as in
test_ddp.py). The ranks read different shards, so equal weights mean DDP synchronised them.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open_clip_train.demo_data import generate
from launch import DUMP_SCRIPT, TORCHRUN, clean_env, free_port, is_launcher_var, load
from open_clip_train.distributed import SLURM_PORT_BASE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-convnext-cliptext"
STEPS = 4  # 32 samples / (2 ranks x batch 4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    demo = generate(root / "demo", num_train=32, num_val=8, image_size=32, seed=0)
    script = root / "dump_main.py"
    script.write_text(DUMP_SCRIPT)
    return root, demo, script


def train_args(demo, logs: Path, name: str):
    return ["--model", MODEL, "--dataset-type", "coco", "--train-data", str(demo.train_annotations),
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--no-augment",
            "--coco-caption-sampling", "random", "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--seed", "0",
            "--log-every-n-steps", "1", "--log-dir", str(logs), "--name", name]


def run_together(commands, envs, timeout: int = 240):
    """Start the processes at once (as nodes or srun tasks would), wait for all of them."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for cmd, env in zip(commands, envs)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:  # a peer failed or hung: end the ones this test started
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{p.args[:3]} failed ({p.returncode}):\n{out[-2000:]}\n{err[-6000:]}"
    return [err for _, err in outs]


@pytest.fixture(scope="module")
def two_nodes(setup):
    """torchrun on 'node 0' and 'node 1', both on localhost, inside a fake srun-per-node step."""
    root, demo, script = setup
    dump = root / "two_nodes"
    dump.mkdir()
    port = free_port()
    commands, envs = [], []
    for node in (0, 1):
        commands.append([str(TORCHRUN), "--nnodes", "2", "--node-rank", str(node), "--nproc_per_node", "1",
                         "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
                         *train_args(demo, root / "logs", "two_nodes")])
        envs.append(clean_env(dump, SLURM_PROCID=node, SLURM_LOCALID=0, SLURM_NTASKS=2, SLURM_NNODES=2,
                              SLURM_JOB_NODELIST="unresolvable-node[1-2]", SLURM_JOB_ID=1))
    stderr = run_together(commands, envs)
    return dump, root / "logs" / "two_nodes", port, stderr


@pytest.fixture(scope="module")
def srun_tasks(setup):
    """Two tasks of `srun --ntasks 2` on one node, without torchrun."""
    root, demo, script = setup
    dump = root / "srun"
    dump.mkdir()
    job_id = 4_200_000 + free_port(range(SLURM_PORT_BASE + 3000, SLURM_PORT_BASE + 4000)) - SLURM_PORT_BASE
    slurm = dict(SLURM_NTASKS=2, SLURM_NNODES=1, SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="localhost",
                 SLURM_JOB_ID=job_id, SLURM_STEP_ID=0, SLURM_NODEID=0)
    commands = [[sys.executable, str(script), *train_args(demo, root / "logs", "srun")]] * 2
    envs = [clean_env(dump, SLURM_PROCID=task, SLURM_LOCALID=task, **slurm) for task in (0, 1)]
    stderr = run_together(commands, envs)
    return dump, root / "logs" / "srun", SLURM_PORT_BASE + job_id % 10000, stderr


def initial_weights() -> dict:
    from open_clip_train.models import create_model
    from open_clip_train.trainer import seed_everything

    seed_everything(0)
    model, _ = create_model(MODEL, precision="fp32", device="cpu")
    return model.state_dict()


def assert_trained_in_sync(dump: Path, run_dir: Path) -> dict:
    r0, r1 = load(dump / "rank0.pt"), load(dump / "rank1.pt")
    assert r0.keys() == r1.keys()
    assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == []
    ckpt = load(run_dir / "checkpoints" / "epoch_1.pt")
    assert all(torch.equal(ckpt["state_dict"][k], r0[k]) for k in r0)
    losses = re.findall(r"Train Epoch: 0 \[(\d+)/32 .*Contrastive_loss: ([0-9.]+)", (run_dir / "out.log").read_text())
    assert [int(n) for n, _ in losses] == [8 * (i + 1) for i in range(STEPS)]  # 2 ranks x 4 per step
    return r0


def test_two_torchrun_nodes_train_together(two_nodes):
    dump, run_dir, port, stderr = two_nodes
    weights = assert_trained_in_sync(dump, run_dir)
    init = initial_weights()
    moved = [k for k in init if init[k].is_floating_point() and not torch.allclose(init[k], weights[k])]
    assert len(moved) > 0.9 * len(init)  # the equality above is not the untouched initialisation
    out = (run_dir / "out.log").read_text()
    assert (f"world: backend=gloo, world_size=2, rank=0, local_rank=0, nodes=2, device=cpu, "
            f"rendezvous=127.0.0.1:{port}, from torchrun") in out
    assert (f"rank 1 | INFO | world: backend=gloo, world_size=2, rank=1, local_rank=0, nodes=2, device=cpu, "
            f"rendezvous=127.0.0.1:{port}, from torchrun") in stderr[1]
    assert "\r" not in out


def test_srun_tasks_without_torchrun_train_together(srun_tasks):
    dump, run_dir, port, stderr = srun_tasks
    assert_trained_in_sync(dump, run_dir)
    out = (run_dir / "out.log").read_text()
    assert (f"world: backend=gloo, world_size=2, rank=0, local_rank=0, nodes=1, device=cpu, "
            f"rendezvous=localhost:{port}, from SLURM (srun)") in out
    assert "rank 1 | INFO | world: backend=gloo, world_size=2, rank=1, local_rank=1, nodes=1" in stderr[1]


def test_both_launchers_train_the_same_thing(two_nodes, srun_tasks):
    """Same seed, world size and shards: the launcher must not change the result."""
    a, b = load(two_nodes[0] / "rank0.pt"), load(srun_tasks[0] / "rank0.pt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_half_set_slurm_environment_stops_before_training(setup, tmp_path, monkeypatch, capsys):
    from open_clip_train.main import main

    _, demo, _ = setup
    for key in filter(is_launcher_var, list(os.environ)):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "0")  # no SLURM_LOCALID, no SLURM_NTASKS
    monkeypatch.setenv("SLURM_JOB_ID", "3")
    assert main(train_args(demo, tmp_path, "x")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: half-set SLURM environment: SLURM_PROCID set but SLURM_LOCALID, SLURM_NTASKS missing; start one "
        "task per GPU with srun (or launch with torchrun), or unset these variables"]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- launcher scripts
SBATCH = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


def test_every_sbatch_script_is_valid_bash():
    assert {p.name for p in SBATCH} >= {"single_node.sbatch", "multi_node.sbatch", "multi_node_srun.sbatch"}
    for path in SBATCH:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert "--log-dir" in code and not re.search(r"--logs\s", code)  # torchrun 2.14 rejects --logs


def test_srun_script_starts_one_task_per_gpu_without_torchrun():
    text = (ROOT / "scripts" / "slurm" / "multi_node_srun.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    command = re.search(r"^srun .*?(?<!\\)\n", text, re.M | re.S).group(0)
    assert "python -m open_clip_train.main" in command and "torchrun" not in command


FAKE_SRUN = """#!/usr/bin/env bash
# stands in for srun: exits 75 on SIGTERM as the trainer does, records its command line (after the
# trap is set and in one rename, so a reader that sees the file can signal it at once)
trap 'echo TERM > "$FAKE_DIR/srun.signal"; exit 75' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args.tmp" && mv "$FAKE_DIR/srun.args.tmp" "$FAKE_DIR/srun.args"
if [ -n "${FAKE_SRUN_EXIT:-}" ]; then exit "$FAKE_SRUN_EXIT"; fi
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scontrol.calls"
if [ "$1" = show ]; then echo localhost; fi
"""


def run_sbatch(script: Path, tmp_path: Path, usr1: bool, srun_exit: str = ""):
    """The sbatch script under bash with fake srun / scontrol; USR1 once srun is running."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = dict(clean_env(tmp_path), PATH=f"{fake}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), REPO=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]", FAKE_SRUN_EXIT=srun_exit)
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if usr1:
            for _ in range(1200):  # up to 30 s on a loaded machine
                if (tmp_path / "srun.args").exists():  # srun's TERM trap is set by then
                    break
                time.sleep(0.025)
            os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@N does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    calls = (tmp_path / "scontrol.calls").read_text().splitlines() if (tmp_path / "scontrol.calls").exists() else []
    return proc.returncode, out, err, calls


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_usr1_stops_the_step_with_sigterm_and_requeues(script, tmp_path):
    text = script.read_text()
    warn = re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M)
    assert warn and int(warn.group(1)) >= 60 and "#SBATCH --requeue" in text
    code, out, err, calls = run_sbatch(script, tmp_path, usr1=True)
    assert code == 0, err
    assert (tmp_path / "srun.signal").read_text().strip() == "TERM"  # forwarded to the step as SIGTERM
    assert "requeue 4242" in calls
    args = (tmp_path / "srun.args").read_text().split("\n")
    assert "open_clip_train.main" in args and args[args.index("--resume") + 1] == "latest"


@pytest.mark.parametrize("srun_exit", ["0", "1"])
def test_sbatch_without_usr1_ends_with_the_step_and_does_not_requeue(srun_exit, tmp_path):
    code, _, _, calls = run_sbatch(ROOT / "scripts" / "slurm" / "single_node.sbatch", tmp_path, usr1=False,
                                   srun_exit=srun_exit)
    assert code == int(srun_exit)  # a finished (or failed) run is not requeued
    assert not [c for c in calls if c.startswith("requeue")]
