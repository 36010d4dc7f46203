"""Launchers and comparisons shared by the multi-process and resume tests.

* `torchrun(...)`: N CPU ranks (gloo) of a script, in a clean environment on one thread each;
* `in_process(...)`: the same run through main() in this process, on one thread too, so kernels
  reduce in the same order as in a torchrun worker;
* `DUMP_SCRIPT`: a launcher that runs the trainer's main and has every rank save the weights it
  ends with to $DUMP_DIR/rank<N>.pt (the trainer itself only checkpoints rank 0) and its exit
  code to $DUMP_DIR/rank<N>.rc;
* `assert_same_checkpoint`: two checkpoints bitwise equal (weights, optimizer state, lrs).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Optional

import torch

from open_clip_train import faults

TORCHRUN = Path(sys.executable).parent / "torchrun"

DUMP_SCRIPT = textwrap.dedent('''
    import os, sys, torch
    from open_clip_train import trainer
    from open_clip_train.main import main

    _close = trainer.Trainer.close

    def close(self):  # every rank saves the weights it ends with
        torch.save(self.model.state_dict(), os.path.join(os.environ["DUMP_DIR"], f"rank{self.world.rank}.pt"))
        _close(self)

    trainer.Trainer.close = close
    code = main()
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    with open(os.path.join(os.environ["DUMP_DIR"], f"rank{rank}.rc"), "w") as f:
        f.write(str(code))
    sys.exit(code)
''')


def free_port(candidates: Optional[Iterable[int]] = None) -> int:
    for port in candidates or [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def is_launcher_var(key: str) -> bool:
    return key.startswith("SLURM_") or key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                               "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", faults.ENV)


def clean_env(dump_dir: Optional[Path] = None, **extra) -> dict:
    """This machine's environment without launcher variables or the fault hook, offline, one
    thread per process, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not is_launcher_var(k)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    if dump_dir is not None:
        env["DUMP_DIR"] = str(dump_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(nproc: int, script: Path, args, dump_dir: Path, *, fault: str = "", max_restarts: int = 0,
             timeout: int = 420, check: bool = True, **env_extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc script args` on localhost, `env_extra` added to the
    environment; with `check` it must succeed."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    for old in [*dump_dir.glob("rank*.pt"), *dump_dir.glob("rank*.rc")]:  # a rerun's dumps are its own
        old.unlink()
    env = clean_env(dump_dir, **({faults.ENV: fault} if fault else {}), **env_extra)
    cmd = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--max-restarts", str(max_restarts),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def in_process(argv, dump_dir: Path, monkeypatch) -> None:
    """The same run in this process, single rank, dumping its final weights as DUMP_SCRIPT does."""
    from open_clip_train import trainer as trainer_module
    from open_clip_train.main import main

    close = trainer_module.Trainer.close

    def dump_then_close(self):
        torch.save(self.model.state_dict(), dump_dir / f"rank{self.world.rank}.pt")
        close(self)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.setattr(trainer_module.Trainer, "close", dump_then_close)
            assert main([str(a) for a in argv]) == 0
    finally:
        torch.set_num_threads(threads)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def assert_same_checkpoint(ref: dict, got: dict) -> None:
    """Bitwise the same training state: step, weights, param groups, per-group lr, optimizer state."""
    assert got["step"] == ref["step"]
    assert_same_weights(ref["state_dict"], got["state_dict"])
    assert got["param_groups"] == ref["param_groups"]
    ro, go = ref["optimizer"], got["optimizer"]
    assert [g["lr"] for g in go["param_groups"]] == [g["lr"] for g in ro["param_groups"]]
    assert ro["state"].keys() == go["state"].keys()
    for i in ro["state"]:
        for key, value in ro["state"][i].items():
            assert torch.equal(value, go["state"][i][key]), (i, key)
