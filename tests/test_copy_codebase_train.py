"""--copy-codebase in a training run: the package's exact source and its checksums in the run
directory; refused in one line without a run directory."""
import hashlib
from pathlib import Path

import open_clip_train
from open_clip_train.main import main

BASE = ["--model", "tiny-convnext-cliptext", "--dataset-type", "synthetic", "--train-num-samples", "2",
        "--batch-size", "2", "--precision", "fp32", "--workers", "0", "--epochs", "1", "--warmup", "1"]


def test_run_records_its_source(tmp_path):
    assert main(BASE + ["--copy-codebase", "--log-dir", str(tmp_path), "--name", "cc"]) == 0
    code = tmp_path / "cc" / "code"
    sums = dict(line.split("  ")[::-1] for line in (code / "SHA256SUMS").read_text().splitlines())
    trainer = Path(open_clip_train.__file__).parent / "trainer.py"
    assert sums["open_clip_train/trainer.py"] == hashlib.sha256(trainer.read_bytes()).hexdigest()
    assert (code / "open_clip_train" / "trainer.py").read_bytes() == trainer.read_bytes()
    assert (code / "git.json").is_file()


def test_without_a_run_directory_is_one_line(capfd):
    assert main(BASE + ["--copy-codebase", "--log-dir", "none"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: --copy-codebase records the source in the run directory; --log-dir none has none"]
