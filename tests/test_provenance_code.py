"""--copy-codebase equivalent: the package copy, its checksums, and a git record from which the
exact tree can be rebuilt (commit + patch)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

import open_clip_train
from open_clip_train.provenance_code import checksums, record_code

GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_SYSTEM=os.devnull)


def git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout


@pytest.fixture
def repo(tmp_path):
    """A repository with a package `pkg` (a module, a config, a cache to leave out), committed."""
    root = tmp_path / "repo"
    pkg = root / "src" / "pkg"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("LR = 0.1\n")
    (pkg / "configs" / "m.json").write_text('{"width": 8}\n')
    (pkg / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0\1")
    (root / "README.md").write_text("hi\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root, pkg


def test_copy_and_checksums_of_this_package(tmp_path):
    pkg = Path(open_clip_train.__file__).parent
    code, new = record_code(tmp_path / "run", pkg)
    assert new and code == tmp_path / "run" / "code"
    for rel, digest in checksums(pkg).items():
        assert (code / rel).read_bytes() == (pkg / rel.split("/", 1)[1]).read_bytes()
    copied = sorted(p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file() and p.parent != code)
    assert copied == sorted(checksums(pkg)) and "open_clip_train/trainer.py" in copied
    assert not any("__pycache__" in c for c in copied)
    # the sums file is what sha256sum -c reads
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=code).returncode == 0


def test_git_record_rebuilds_the_exact_tree(repo, tmp_path):
    root, pkg = repo
    head = git(root, "rev-parse", "HEAD").strip()
    (pkg / "train.py").write_text("LR = 0.2  # changed, not committed\n")
    (pkg / "new_loss.py").write_text("W = 3\n")  # untracked
    code, _ = record_code(tmp_path / "run", pkg)
    record = json.loads((code / "git.json").read_text())
    assert record["commit"] == head and record["dirty"] and record["package"] == "src/pkg"
    assert record["untracked"] == ["src/pkg/new_loss.py"]
    assert (code / "pkg" / "new_loss.py").read_text() == "W = 3\n"  # untracked but copied
    # commit + patch gives the tree that ran
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True, env=GIT_ENV)
    git(clone, "checkout", "-q", record["commit"])
    git(clone, "apply", str(code / "uncommitted.patch"))
    assert (clone / "src" / "pkg" / "train.py").read_text() == (code / "pkg" / "train.py").read_text()


def test_clean_checkout_has_no_patch(repo, tmp_path):
    root, pkg = repo
    code, _ = record_code(tmp_path / "run", pkg)
    assert json.loads((code / "git.json").read_text())["dirty"] is False
    assert not (code / "uncommitted.patch").exists()


def test_outside_git_the_copy_is_the_record(tmp_path):
    pkg = tmp_path / "plain" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    code, _ = record_code(tmp_path / "run", pkg)
    assert json.loads((code / "git.json").read_text())["git"] is False
    assert (code / "pkg" / "a.py").read_text() == "x = 1\n"


def test_resume_keeps_the_copy_or_adds_one_when_the_source_changed(repo, tmp_path):
    _, pkg = repo
    run = tmp_path / "run"
    first, new = record_code(run, pkg)
    assert new
    assert record_code(run, pkg) == (first, False)  # same source: nothing written
    (pkg / "train.py").write_text("LR = 0.3\n")
    second, new = record_code(run, pkg)
    assert new and second == run / "code-2"
    assert (first / "pkg" / "train.py").read_text() == "LR = 0.1\n"  # the first attempt's stays
    assert (second / "pkg" / "train.py").read_text() == "LR = 0.3\n"
    assert record_code(run, pkg) == (second, False)
    assert sorted(p.name for p in run.iterdir()) == ["code", "code-2"]  # no temporary folders left
