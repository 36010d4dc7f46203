"""Upstream flags wired into the trainer: --remote-sync (a file:// target through main), --log-local."""
import logging
from pathlib import Path

import pytest

from open_clip_train import remote_sync
from open_clip_train.main import main

BASE = ["--model", "tiny-convnext-cliptext", "--dataset-type", "synthetic", "--train-num-samples", "2",
        "--batch-size", "2", "--precision", "fp32", "--workers", "0", "--epochs", "1", "--warmup", "1"]


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_remote_sync_holds_the_finished_run(tmp_path):
    from open_clip_train.demo_data import generate

    demo = generate(tmp_path / "demo", num_train=2, num_val=2, image_size=32)
    remote = tmp_path / "bucket"
    coco = [a.replace("synthetic", "coco") for a in BASE]
    rc = main(coco + ["--train-data", str(demo.train_annotations), "--val-data", str(demo.val_annotations), "--log-dir", str(tmp_path / "logs"), "--name", "rs", "--remote-sync", f"file://{remote}",
                      "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "3600"])
    assert rc == 0
    local, copy = _files(tmp_path / "logs" / "rs"), _files(remote / "rs")
    for name in ("out.log", "params.txt", "checkpoints/results.jsonl", "checkpoints/epoch_1.pt"):
        assert name in copy, name
    # the final sync ran after the last write: the copy is the run directory, byte for byte, except the
    # log lines written after it (the sync's own report)
    assert {k: v for k, v in copy.items() if k != "out.log"} == {k: v for k, v in local.items() if k != "out.log"}
    assert local["out.log"].startswith(copy["out.log"])


@pytest.mark.slow
def test_remote_failing_midway_is_logged_and_the_local_run_completes(tmp_path, monkeypatch):
    calls = []
    real = remote_sync.RemoteSync._sync_fsspec

    def first_only(self):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("remote went away")
        return real(self)

    monkeypatch.setattr(remote_sync.RemoteSync, "_sync_fsspec", first_only)
    rc = main(BASE + ["--log-dir", str(tmp_path / "logs"), "--name", "rf", "--remote-sync",
                      f"file://{tmp_path / 'bucket'}", "--remote-sync-protocol", "fsspec"])
    assert rc == 0 and len(calls) == 2  # the first sync, then the final one that failed
    local = tmp_path / "logs" / "rf"
    assert (local / "checkpoints" / "epoch_1.pt").is_file()
    log = (local / "out.log").read_text()
    assert "remote sync to" in log and "remote went away" in log
    assert not (tmp_path / "bucket" / "rf" / "checkpoints" / "epoch_1.pt").exists()


def test_remote_sync_first_failure_and_bad_settings_are_one_line(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the remote directory should go
    assert main(BASE + ["--log-dir", str(tmp_path / "logs"), "--name", "x", "--remote-sync", f"file://{blocker}",
                        "--remote-sync-protocol", "fsspec"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --remote-sync file://") and "first sync failed" in err[-1]
    assert main(BASE + ["--log-dir", "none", "--remote-sync", f"file://{tmp_path}", "--remote-sync-protocol",
                        "fsspec"]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "error: --remote-sync copies the run directory; --log-dir none has none"]
    assert main(BASE + ["--log-dir", str(tmp_path / "l2"), "--remote-sync", f"file://{tmp_path}",
                        "--remote-sync-protocol", "fsspec", "--remote-sync-frequency", "0"]) == 2
    assert "--remote-sync-frequency 0" in capfd.readouterr().err
    assert not (tmp_path / "l2").exists()  # refused before the run directory


def _open(tmp_path, log_local: bool, rank: int, local_rank: int):
    from open_clip_train.cli_config import config_from_args
    from open_clip_train.distributed import World
    from open_clip_train.main import _open_run
    from open_clip_train.params import parse_args
    from open_clip_train.run_outputs import teardown_logging

    args = BASE + ["--log-dir", str(tmp_path), "--name", "ll"] + (["--log-local"] if log_local else [])
    cfg = config_from_args(parse_args(args))
    world = World(rank=rank, local_rank=local_rank, world_size=4, num_nodes=2)
    try:
        _open_run(cfg, world, "cpu", args)
        logging.info(f"hello from rank {rank}")
    finally:
        teardown_logging()
    return sorted(p.name for p in (tmp_path / "ll").glob("out*")) if (tmp_path / "ll").exists() else []


def test_log_local_writes_one_file_per_node_master(tmp_path):
    # rank 2 is local rank 0 of the second node: with --log-local it keeps its own out-2, as upstream
    assert _open(tmp_path / "a", True, rank=2, local_rank=0) == ["out-2"]
    assert "hello from rank 2" in (tmp_path / "a" / "ll" / "out-2").read_text()
    assert _open(tmp_path / "b", True, rank=3, local_rank=1) == []  # not a node master: stderr only
    assert _open(tmp_path / "c", False, rank=2, local_rank=0) == []  # without the flag: rank 0 only
    assert _open(tmp_path / "d", True, rank=0, local_rank=0) == ["out.log"]
