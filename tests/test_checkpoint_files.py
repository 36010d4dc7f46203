"""Checkpoint files, the stop flag, the fault hook's grammar and torn results lines, without training."""
import logging
import os
import signal

import pytest
import torch

from open_clip_train import checkpoint as ckpt
from open_clip_train import faults
from open_clip_train.errors import UserError
from open_clip_train.preempt import StopRequest
from open_clip_train.run_outputs import (append_metrics, append_result, drop_metrics_after, drop_results_after, read_jsonl,
                                        read_results, setup_logging, teardown_logging)


def write(path, epoch, step, **extra):
    ckpt.atomic_save({"epoch": epoch, "step": step, "state_dict": {"w": torch.zeros(3)}, **extra}, path)


def test_find_latest_orders_by_recorded_position_not_name_or_mtime(tmp_path):
    write(tmp_path / "epoch_2.pt", 2, 8)
    write(tmp_path / "step_10.pt", 2, 10, epoch_step=2)
    write(tmp_path / "epoch_1.pt", 1, 4)  # written last: newest mtime, oldest position
    assert ckpt.find_latest(tmp_path).name == "step_10.pt"
    write(tmp_path / "epoch_latest.pt", 3, 12)
    assert ckpt.find_latest(tmp_path).name == "epoch_latest.pt"
    write(tmp_path / "epoch_3.pt", 3, 12)  # same position as epoch_latest.pt: the numbered file
    assert ckpt.find_latest(tmp_path).name == "epoch_3.pt"


def test_find_latest_skips_torn_and_temporary_files(tmp_path, caplog):
    write(tmp_path / "epoch_1.pt", 1, 4)
    write(tmp_path / "epoch_2.pt", 2, 8)
    data = (tmp_path / "epoch_2.pt").read_bytes()
    (tmp_path / "epoch_2.pt").write_bytes(data[: len(data) // 2])  # e.g. upstream's non-atomic save, killed
    (tmp_path / ".step_12.pt.tmp-123").write_bytes(data)  # a complete-looking temp file never counts
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_latest(tmp_path).name == "epoch_1.pt"
    assert "skipping" in caplog.text and "epoch_2.pt" in caplog.text
    assert ckpt.remove_stale_temps(tmp_path) == [tmp_path / ".step_12.pt.tmp-123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "epoch_2.pt"]


def test_find_latest_in_an_empty_or_missing_directory(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    assert ckpt.find_latest(tmp_path / "missing") is None


def test_fault_grammar_and_inertness():
    assert faults.parse("crash_at_step:7") == faults.Fault("crash_at_step", 7, None)
    assert faults.parse("kill_in_save:8:rank=1") == faults.Fault("kill_in_save", 8, 1)
    for bad in ("crash:7", "crash_at_step", "crash_at_step:x", "kill_at_step:3:node=1"):
        with pytest.raises(UserError, match="OPEN_CLIP_TRAIN_FAULT"):
            faults.parse(bad)
    assert faults.from_env({}) is None
    assert faults.from_env({faults.ENV: "crash_at_step:7"}) == faults.Fault("crash_at_step", 7)
    # a torchrun restart does not inject the fault again
    assert faults.from_env({faults.ENV: "crash_at_step:7", "TORCHELASTIC_RESTART_COUNT": "1"}) is None
    faults.install(None, 0)
    faults.at_step(7)  # inert: returns
    faults.install(faults.Fault("crash_at_step", 7, rank=1), rank=0)
    try:
        faults.at_step(7)  # another rank's fault
        faults.install(faults.Fault("crash_at_step", 7), rank=0)
        faults.at_step(6)
        with pytest.raises(faults.InjectedCrash):
            faults.at_step(7)
    finally:
        faults.install(None, 0)


def test_stop_request_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGUSR1
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


def test_torn_results_line_is_dropped_before_appending(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    for epoch in (1, 2, 3):
        append_result(path, {"epoch": epoch, "x": 0.5})
    with open(path, "a") as f:
        f.write('{"epoch": 4, "x": 0.')  # killed mid-append
    with caplog.at_level(logging.WARNING):
        drop_results_after(path, 2)  # resuming after epoch 2: epoch 3 is trained again
    assert "dropping half-written line 4" in caplog.text
    append_result(path, {"epoch": 3, "x": 0.25})
    assert read_results(path) == [{"epoch": 1, "x": 0.5}, {"epoch": 2, "x": 0.5}, {"epoch": 3, "x": 0.25}]


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (5, 10, 15):
        append_metrics(path, {"step": step, "losses": {"contrastive_loss": torch.tensor(float("nan"))}})
    with open(path, "a") as f:
        f.write('{"step": 20, "los')
    drop_metrics_after(path, 10)  # the checkpoint was at step 10: steps 11.. are trained again
    append_metrics(path, {"step": 15, "losses": {"contrastive_loss": 1.5}})
    assert read_jsonl(path) == [{"step": 5, "losses": {"contrastive_loss": "nan"}},
                                {"step": 10, "losses": {"contrastive_loss": "nan"}},
                                {"step": 15, "losses": {"contrastive_loss": 1.5}}]


def test_out_log_is_appended_and_a_torn_last_line_ended(tmp_path):
    log = tmp_path / "out.log"
    log.write_text("first run line\nhalf a li")
    setup_logging(log)
    try:
        logging.info("resumed")
    finally:
        teardown_logging()
    lines = log.read_text().splitlines()
    assert lines[:2] == ["first run line", "half a li"] and lines[2].endswith("| INFO | resumed")
