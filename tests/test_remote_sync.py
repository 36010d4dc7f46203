"""Remote sync of the run directory: a local file:// target, changed files only, a failing target
that leaves the local copy alone, the periodic thread and the final sync, upstream's aws mode."""
import logging
import os
import stat
import time
from pathlib import Path

import pytest

from open_clip_train import remote_sync as rs
from open_clip_train.remote_sync import RemoteSync, RemoteSyncCfg, RemoteSyncError, check, remote_run_url


def _run_dir(root: Path) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "out.log").write_text("line 1\n")
    (root / "params.txt").write_text("lr: 0.1\n")
    (root / "checkpoints" / "epoch_1.pt").write_bytes(os.urandom(4096))
    (root / "checkpoints" / "epoch_latest.pt").write_bytes(b"A" * 1000)
    (root / "checkpoints" / ".epoch_2.pt.tmp-1234").write_bytes(b"half a checkpoint")
    return root


def _snapshot(root: Path) -> dict:
    """Every local file's bytes and stat, to prove a sync never touches them."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.read_bytes() if p.is_file() else None, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _expected(local: Path) -> dict:
    return {k: v for k, v in _tree(local).items() if ".tmp-" not in k}


def test_sync_copies_everything_but_temp_files_then_only_changes(tmp_path):
    local = _run_dir(tmp_path / "logs" / "run1")
    remote = tmp_path / "bucket" / "run1"
    sync = RemoteSync(local, remote_run_url(f"file://{tmp_path / 'bucket'}/", "run1"), "fsspec")
    assert sync.sync_once()
    assert _tree(remote) == _expected(local) and len(_tree(remote)) == 4
    untouched = (remote / "checkpoints" / "epoch_1.pt").stat().st_mtime_ns

    with open(local / "out.log", "a") as f:
        f.write("line 2\n")
    latest = local / "checkpoints" / "epoch_latest.pt"
    before = latest.stat().st_mtime_ns
    latest.write_bytes(b"B" * 1000)  # same size, new contents
    # a later rewrite has a later mtime; set it, as a filesystem's clock may not have ticked yet
    os.utime(latest, ns=(latest.stat().st_atime_ns, max(latest.stat().st_mtime_ns, before + 1_000_000)))
    (local / "checkpoints" / "results.jsonl").write_text('{"epoch": 1}\n')
    assert sync.sync_once()
    assert _tree(remote) == _expected(local)
    assert (remote / "checkpoints" / "epoch_1.pt").stat().st_mtime_ns == untouched  # not sent again
    assert not [p for p in remote.rglob("*") if ".sync-" in p.name]  # no temporary names left


def test_first_sync_failure_is_one_line_and_leaves_local_alone(tmp_path, caplog):
    local = _run_dir(tmp_path / "run")
    before = _snapshot(local)
    (tmp_path / "not_a_dir").write_text("x")
    sync = RemoteSync(local, f"file://{tmp_path / 'not_a_dir' / 'runs' / 'run'}", "fsspec", every_s=0.01)
    with caplog.at_level(logging.ERROR), pytest.raises(RemoteSyncError) as e:
        sync.start()
    assert "first sync failed" in str(e.value) and "\n" not in str(e.value)
    assert any("remote sync to" in r.message and "local run directory is unchanged" in r.message for r in caplog.records)
    assert sync._thread is None  # no periodic sync was started
    assert _snapshot(local) == before


def test_failure_midway_is_logged_retried_and_never_alters_local(tmp_path, monkeypatch, caplog):
    local = _run_dir(tmp_path / "run")
    remote = tmp_path / "remote"
    sync = RemoteSync(local, f"file://{remote}", "fsspec")
    before = _snapshot(local)
    import fsspec.implementations.local as fl

    real_put, calls = fl.LocalFileSystem.put_file, []

    def flaky_put(self, lpath, rpath, **kw):
        calls.append(lpath)
        if len(calls) == 2:  # half a file reaches the remote, then the connection drops
            Path(rpath).write_bytes(b"partial")
            raise OSError("connection reset by peer")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(fl.LocalFileSystem, "put_file", flaky_put)
    with caplog.at_level(logging.ERROR):
        assert not sync.sync_once()
    assert "connection reset by peer" in caplog.text and sync.failures == 1
    assert _snapshot(local) == before
    assert len(_tree(remote)) == 1  # the first file only: nothing half-written, no temporary left
    assert sync.sync_once()  # the next sync completes the copy
    assert _tree(remote) == _expected(local) and _snapshot(local) == before


def test_periodic_thread_and_final_sync(tmp_path):
    local = _run_dir(tmp_path / "run")
    remote = tmp_path / "remote"
    sync = RemoteSync(local, f"file://{remote}", "fsspec", every_s=0.05)
    sync.start()
    try:
        (local / "checkpoints" / "epoch_2.pt").write_bytes(b"two")
        deadline = time.time() + 10
        while not (remote / "checkpoints" / "epoch_2.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        assert (remote / "checkpoints" / "epoch_2.pt").read_bytes() == b"two"  # the thread sent it
    finally:
        sync.every_s = 3600  # from here on only close() may sync
        time.sleep(0.1)  # let a sync that is running end
    with open(local / "out.log", "a") as f:
        f.write("the end\n")
    assert sync.close()
    assert sync._thread is None
    assert _tree(remote) == _expected(local)


def test_check_refuses_bad_settings_before_any_work(tmp_path, monkeypatch):
    ok = RemoteSyncCfg(remote=f"file://{tmp_path}", protocol="fsspec")
    check(ok)
    check(RemoteSyncCfg())  # off
    cases = {
        "use one of fsspec, s3": RemoteSyncCfg(remote="file:///x", protocol="rsync"),
        "must be a positive number": RemoteSyncCfg(remote="file:///x", protocol="fsspec", frequency=0),
        "not a URL fsspec can open": RemoteSyncCfg(remote="nosuchproto://bucket/x", protocol="fsspec"),
    }
    try:
        import s3fs  # noqa: F401
    except ImportError:
        cases["s3fs"] = RemoteSyncCfg(remote="s3://bucket/runs", protocol="fsspec")
    monkeypatch.setattr(rs.shutil, "which", lambda name: None)
    cases["aws CLI, which is not on PATH"] = RemoteSyncCfg(remote="s3://bucket/runs", protocol="s3")
    for want, cfg in cases.items():
        with pytest.raises(RemoteSyncError) as e:
            check(cfg)
        assert want in str(e.value) and "\n" not in str(e.value), (want, str(e.value))


def test_s3_protocol_runs_aws_s3_sync(tmp_path, monkeypatch):
    """Upstream's mode: `aws s3 sync LOCAL REMOTE`, skipping checkpoint temp files; its failure
    is logged like any other."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    aws = bin_dir / "aws"
    aws.write_text(f'#!/bin/sh\necho "$@" > {record}\n[ -z "$AWS_FAIL" ] || {{ echo "denied" >&2; exit 1; }}\n')
    aws.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    local = _run_dir(tmp_path / "run")
    check(RemoteSyncCfg(remote="s3://bucket/runs", protocol="s3"))
    sync = RemoteSync(local, "s3://bucket/runs/run", "s3")
    assert sync.sync_once()
    assert record.read_text().split() == ["s3", "sync", str(local), "s3://bucket/runs/run", "--exclude", "*.tmp-*",
                                          "--only-show-errors"]
    monkeypatch.setenv("AWS_FAIL", "1")
    assert not sync.sync_once() and sync.failures == 1
