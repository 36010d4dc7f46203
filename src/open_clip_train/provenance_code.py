"""`--copy-codebase`: keep the exact source a run trained with, in its run directory.

    <run>/code/open_clip_train/...   a copy of this package as it was imported (.py, configs)
    <run>/code/SHA256SUMS            one `sha256  path` line per copied file (`sha256sum -c` checks it)
    <run>/code/git.json              commit, branch, whether the work tree was dirty, untracked files
    <run>/code/uncommitted.patch     `git diff --binary HEAD`: apply it to the commit to get the tree

Upstream copies its whole repository (data and notebooks included) and refuses to start if the
copy exists. Here the copy is the package only (a few hundred kB; what ran), and the git record
covers the rest of the repository. A resumed run whose source is unchanged keeps the first copy;
if the source changed, it is kept beside it as `code-2/`, `code-3/`, ..., so every attempt's
source is on record. Outside a git checkout (an installed package), git.json says so and the copy
is the record. Rank 0 only.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PACKAGE_DIR = Path(__file__).resolve().parent
KEEP_SUFFIXES = (".py", ".json", ".txt", ".md", ".yaml", ".yml", ".sh")
SUMS = "SHA256SUMS"


def source_files(package_dir: Path) -> List[Path]:
    """The package's source files (no caches or compiled files), sorted."""
    return sorted(p for p in package_dir.rglob("*")
                  if p.is_file() and p.suffix in KEEP_SUFFIXES and "__pycache__" not in p.parts)


def checksums(package_dir: Path) -> Dict[str, str]:
    """`<package>/<relative path>` -> sha256 of the file's bytes."""
    name = package_dir.name
    return {f"{name}/{p.relative_to(package_dir).as_posix()}": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in source_files(package_dir)}


def _git(repo: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None


def git_record(package_dir: Path) -> Tuple[Dict, Optional[str]]:
    """(git.json's contents, the uncommitted patch or None) for the repository holding package_dir."""
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None:
        return {"git": False, "note": "the package is not in a git checkout; the copy is the record"}, None
    repo = Path(top.strip())
    patch = _git(repo, "diff", "--binary", "HEAD") or ""
    untracked = [f for f in (_git(repo, "ls-files", "--others", "--exclude-standard") or "").splitlines() if f]
    record = {
        "git": True,
        "commit": (_git(repo, "rev-parse", "HEAD") or "").strip() or None,
        "branch": (_git(repo, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None,
        "dirty": bool(patch) or bool(untracked),
        "untracked": untracked,  # not in the patch; those inside the package are in the copy
        "package": package_dir.resolve().relative_to(repo.resolve()).as_posix()
        if package_dir.resolve().is_relative_to(repo.resolve()) else str(package_dir),
    }
    return record, patch


def _existing(run_dir: Path) -> List[Path]:
    first = run_dir / "code"
    others = sorted(run_dir.glob("code-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else 0)
    return ([first] if first.exists() else []) + others


def _read_sums(code_dir: Path) -> Dict[str, str]:
    path = code_dir / SUMS
    if not path.exists():
        return {}
    return {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in path.read_text().splitlines() if "  " in line}


def record_code(run_dir: Path, package_dir: Path = PACKAGE_DIR) -> Tuple[Path, bool]:
    """Copy the package and its git record into run_dir; returns (the code folder, whether it
    was written now). A folder of identical source is reused."""
    run_dir, package_dir = Path(run_dir), Path(package_dir)
    sums = checksums(package_dir)
    existing = _existing(run_dir)
    if existing and _read_sums(existing[-1]) == sums:
        return existing[-1], False
    dest = run_dir / ("code" if not existing else f"code-{len(existing) + 1}")
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for rel in sums:
        src = package_dir / rel.split("/", 1)[1]
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / rel)
    copied = checksums(tmp / package_dir.name)  # of the bytes copied, should a file change meanwhile
    (tmp / SUMS).write_text("".join(f"{h}  {rel}\n" for rel, h in copied.items()))
    record, patch = git_record(package_dir)
    (tmp / "git.json").write_text(json.dumps(record, indent=2) + "\n")
    if patch:
        (tmp / "uncommitted.patch").write_text(patch)
    tmp.rename(dest)  # a folder of this name is always complete
    return dest, True
