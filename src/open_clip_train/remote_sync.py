"""`--remote-sync URL`: copy the run directory to a remote place while training, as upstream.

    --remote-sync URL --remote-sync-frequency SECONDS --remote-sync-protocol fsspec|s3

The run directory `<logs>/<name>` goes to `URL/<name>` (`remote_run_url`). `start()` syncs once
and raises `RemoteSyncError` (one line) if that fails, so a wrong URL or missing credentials stop
the run at once (upstream exits there too); then a daemon thread syncs every SECONDS, and
`close()` stops it (after the sync in progress) and syncs a last time.

* fsspec: any fsspec URL (`file:///mnt/backup/runs`, `s3://bucket/runs` with s3fs installed,
  `gs://` with gcsfs, ...). A file is uploaded when the remote lacks it, its size differs, or it
  changed since this process uploaded it (checkpoints such as epoch_latest.pt are rewritten at the
  same size; a file already remote at the same size when the process starts is taken as the same,
  as upstream, until it changes). On a local target each file is written under a temporary name and renamed, so the
  copy never holds half a checkpoint; object stores write whole objects anyway.
* s3: upstream's `aws s3 sync` (the aws CLI must be on PATH).

The local directory is only ever read: a failed sync is logged and retried at the next period,
and never deletes or changes a local file. Temporary files of checkpoint writes in progress
(`.<name>.tmp-<pid>`) are skipped; a checkpoint is replaced by rename, so a file being read keeps
its old, complete contents. Runs on rank 0 only.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

PROTOCOLS = ("fsspec", "s3")
SKIP = re.compile(r"^\..+\.tmp-\d+$")  # checkpoint.atomic_save's temporary files


class RemoteSyncError(ValueError):
    """The remote cannot be used (bad URL, missing package or CLI, first sync failed)."""


@dataclass(frozen=True)
class RemoteSyncCfg:
    remote: Optional[str] = None  # --remote-sync
    frequency: int = 300  # --remote-sync-frequency, seconds
    protocol: str = "s3"  # --remote-sync-protocol (upstream's default)

    @property
    def enabled(self) -> bool:
        return bool(self.remote)


def remote_run_url(remote: str, name: str) -> str:
    return remote.rstrip("/") + "/" + name


def check(cfg: RemoteSyncCfg) -> None:
    """Before any work: the protocol, the frequency, and that a filesystem serves the URL."""
    if not cfg.enabled:
        return
    if cfg.protocol not in PROTOCOLS:
        raise RemoteSyncError(f"--remote-sync-protocol {cfg.protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if cfg.frequency <= 0:
        raise RemoteSyncError(f"--remote-sync-frequency {cfg.frequency}: must be a positive number of seconds")
    if cfg.protocol == "s3":
        if shutil.which("aws") is None:
            raise RemoteSyncError("--remote-sync-protocol s3 runs the aws CLI, which is not on PATH; install it, or "
                                  "use --remote-sync-protocol fsspec (s3:// URLs then need the s3fs package)")
        return
    _filesystem(cfg.remote)


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package to install
        raise RemoteSyncError(f"--remote-sync {url}: {' '.join(str(e).split())}") from None
    except (ValueError, TypeError) as e:
        raise RemoteSyncError(f"--remote-sync {url}: not a URL fsspec can open ({e})") from None


def local_files(root: Path) -> Dict[str, Tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file to sync under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if SKIP.match(f):
                continue
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except FileNotFoundError:  # removed since listed (a checkpoint rotated away)
                continue
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _remove_quietly(fs, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # the sync's own error is the one to report
        pass


class RemoteSync:
    """One run directory and its remote copy; see the module docstring."""

    def __init__(self, local_dir: Path, remote_url: str, protocol: str = "fsspec", every_s: float = 300):
        self.local_dir, self.remote_url, self.protocol, self.every_s = Path(local_dir), remote_url, protocol, every_s
        self.uploaded: Dict[str, Tuple[int, int]] = {}  # what this process sent, by local (size, mtime)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()  # one sync at a time (the periodic one and close's)
        self.failures = 0

    # ------------------------------------------------------------------ one sync
    def sync_once(self) -> bool:
        """Copy what changed; True on success. Never raises: failures are logged."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                n, size = self._sync_s3() if self.protocol == "s3" else self._sync_fsspec()
            except Exception as e:  # any failure of the remote side; the local copy is untouched
                self.failures += 1
                logging.error(f"remote sync to {self.remote_url} failed: {type(e).__name__}: {' '.join(str(e).split())}"
                              " (the local run directory is unchanged; retrying at the next sync)")
                return False
            what = "aws s3 sync" if n is None else f"{n} file(s), {size / 2**20:.1f} MiB"
            logging.info(f"remote sync: {what} to {self.remote_url} in {time.perf_counter() - t0:.1f}s")
            return True

    def _sync_fsspec(self) -> Tuple[int, int]:
        fs, root = _filesystem(self.remote_url)
        local_fs = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
        fs.makedirs(root, exist_ok=True)
        sent, size = 0, 0
        for rel, stamp in sorted(local_files(self.local_dir).items()):
            if self.uploaded.get(rel) == stamp:
                continue
            target = f"{root.rstrip('/')}/{rel}"
            if rel not in self.uploaded and fs.exists(target) and fs.size(target) == stamp[0]:
                self.uploaded[rel] = stamp  # already there (an earlier attempt of this run)
                continue
            parent = target.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            if local_fs:  # rename into place: the copy never holds a half-written file
                tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.sync-{os.getpid()}"
                try:
                    fs.put_file(str(self.local_dir / rel), tmp)
                    fs.mv(tmp, target)
                except Exception:
                    _remove_quietly(fs, tmp)
                    raise
            else:
                fs.put_file(str(self.local_dir / rel), target)
            self.uploaded[rel] = stamp
            sent, size = sent + 1, size + stamp[0]
        return sent, size

    def _sync_s3(self) -> Tuple[None, int]:
        cmd = ["aws", "s3", "sync", str(self.local_dir), self.remote_url, "--exclude", "*.tmp-*", "--only-show-errors"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"aws s3 sync exited {result.returncode}: {result.stderr.strip()[-500:]}")
        return None, 0  # the CLI does not say what it copied

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """First sync (RemoteSyncError if it fails), then the periodic thread."""
        if not self.sync_once():
            raise RemoteSyncError(f"--remote-sync {self.remote_url}: the first sync failed (see the log above); "
                                  "check the URL and credentials")
        self._thread = threading.Thread(target=self._loop, name="remote-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync_once()

    def close(self) -> bool:
        """Stop the periodic sync (after the one in progress) and sync a last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        logging.info("final remote sync")
        return self.sync_once()
