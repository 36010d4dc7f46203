"""The name trap: open_clip_torch bundles its own top-level `open_clip_train`. Every launch form,
from any directory and with no PYTHONPATH, must run THIS repository's trainer.

Each check runs a fresh interpreter from an empty temporary directory, because the current
process (pytest, started in the repo) may see `src/` on sys.path for other reasons.
"""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
BIN = Path(sys.executable).parent  # the virtualenv's bin/, whichever way pytest was started
OUR_ONLY_FLAG = "--unfreeze-image-at-epoch"  # upstream's trainer has no such flag


@pytest.fixture(scope="module")
def clean_env():
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    assert "PYTHONPATH" not in env
    return env


def run(cmd, cwd, env, timeout=180):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_upstream_bundle_is_installed_and_untouched():
    """The trap exists (upstream's copy is in site-packages) and our install did not overwrite it."""
    dist = importlib.metadata.distribution("open_clip_torch")
    upstream_main = Path(dist.locate_file("open_clip_train/main.py"))
    upstream_params = Path(dist.locate_file("open_clip_train/params.py"))
    assert upstream_main.is_file() and "def main(" in upstream_main.read_text()
    assert OUR_ONLY_FLAG not in upstream_params.read_text()
    assert SRC not in upstream_main.resolve().parents


def test_import_resolves_to_this_repo(tmp_path, clean_env):
    code = "import json, open_clip_train, open_clip_train.main as m; print(json.dumps([open_clip_train.__file__, m.__file__]))"
    files = json.loads(run([BIN / "python", "-c", code], tmp_path, clean_env).stdout)
    for f in files:
        assert Path(f).resolve().parent == SRC / "open_clip_train"


@pytest.mark.parametrize(
    "launcher",
    [
        ["python", "-m", "open_clip_train.main"],
        ["torchrun", "--nproc_per_node", "1", "-m", "open_clip_train.main"],
        ["python", "-m", "training.main"],
    ],
    ids=["python-m", "torchrun-m", "training-alias"],
)
def test_every_launch_form_runs_this_trainer(launcher, tmp_path, clean_env):
    proc = run([BIN / launcher[0], *launcher[1:], "--help"], tmp_path, clean_env)
    assert OUR_ONLY_FLAG in proc.stdout
    assert "--dry-run" in proc.stdout and "--log-dir" in proc.stdout
    assert "--model" in proc.stdout  # and upstream's flags are still there
    assert "Traceback" not in proc.stderr


def test_training_alias_warns_and_reexports_our_main(tmp_path, clean_env):
    code = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import training
    import training.main
import open_clip_train.main
print(json.dumps({
    "future": [str(w.message) for w in caught if issubclass(w.category, FutureWarning)],
    "same_main": training.main.main is open_clip_train.main.main,
    "training_file": training.__file__,
}))
"""
    out = json.loads(run([BIN / "python", "-c", code], tmp_path, clean_env).stdout)
    assert out["same_main"]
    assert len(out["future"]) == 1 and "open_clip_train" in out["future"][0]
    assert Path(out["training_file"]).resolve().parent == SRC / "training"
