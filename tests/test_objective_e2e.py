"""Distillation and head alignment through main([...]) on tiny models: the tiny analogue of the
seed's Part B (a linear-head teacher checkpoint, an attention-pool student loading its trunk and
text tower, both locked)."""
import json
import re
from pathlib import Path

import pytest
import torch

from open_clip_train.demo_data import generate
from open_clip_train.main import main
from open_clip_train.models import create_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("obj")
    generate(root / "coco", num_train=48, num_val=12, image_size=32, seed=2)
    torch.manual_seed(0)
    teacher, _ = create_model("tiny-convnext-cliptext-linear")
    ckpt = root / "teacher.pt"
    torch.save({"epoch": 1, "state_dict": teacher.state_dict()}, ckpt)
    return root, ckpt


def _run(root: Path, ckpt: Path, name: str, *extra: str) -> str:
    ann = root / "coco" / "annotations"
    rc = main([
        "--model", "tiny-convnext-cliptext", "--pretrained", str(ckpt), "--dataset-type", "coco",
        "--train-data", str(ann / "captions_train2017.json"), "--val-data", str(ann / "captions_val2017.json"),
        "--coco-caption-sampling", "random", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
        "--warmup", "2", "--workers", "0", "--precision", "fp32", "--no-augment", "--log-every-n-steps", "1",
        "--lock-image", "--lock-text", "--log-dir", str(root / "logs"), "--name", name, *extra,
    ])
    assert rc == 0
    return (root / "logs" / name / "out.log").read_text()


def _losses(log: str, term: str):
    return [float(x) for x in re.findall(rf"{term}: ([0-9.]+)", log)]


def test_distill_shares_trunk_until_unlock(setup):
    root, ckpt = setup
    log = _run(root, ckpt, "distill", "--distill", "--teacher-model", "tiny-convnext-cliptext-linear",
               "--teacher-pretrained", str(ckpt), "--distill-weight", "0.5",
               "--unfreeze-image-at-epoch", "1")
    assert _losses(log, "Contrastive_loss") and _losses(log, "Distill_loss")
    # same frozen trunk and text tower from one checkpoint, fed the same batch: shared
    assert re.search(r"teacher image_trunk: shared with the student", log), log
    assert "stops sharing the student's image_trunk (unlocked)" in log
    params = (root / "logs" / "distill" / "params.txt").read_text()
    assert "distill: True" in params and "teacher_model: tiny-convnext-cliptext-linear" in params


def test_upstream_distill_flags_are_aliases(setup):
    root, ckpt = setup
    log = _run(root, ckpt, "distill_upstream_flags", "--distill-model", "tiny-convnext-cliptext-linear",
               "--distill-pretrained", str(ckpt), "--accum-freq", "2")
    assert _losses(log, "Distill_loss")


def test_headalign_loss_falls(setup):
    root, ckpt = setup
    log = _run(root, ckpt, "headalign", "--headalign", "--headalign-weight", "1.0", "--lr", "5e-3")
    values = _losses(log, "Headalign_loss")
    assert len(values) >= 6
    assert values[-1] < values[0]  # only the new head trains: it moves toward the reference head
    rows = [json.loads(l) for l in (root / "logs" / "headalign" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--headalign"], "--headalign needs --pretrained"),
    (["--distill", "--teacher-model", "tiny-convnext-cliptext-linear"], "--teacher-pretrained"),
    (["--teacher-model", "tiny-convnext-cliptext-linear"], "without --distill"),
])
def test_objective_user_errors(setup, argv, message, capsys):
    root, _ = setup
    ann = root / "coco" / "annotations"
    rc = main(["--model", "tiny-convnext-cliptext", "--dataset-type", "coco",
               "--train-data", str(ann / "captions_train2017.json"), "--log-dir", str(root / "errlogs"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
