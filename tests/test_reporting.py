"""--report-to tensorboard,wandb: the scalars a run reports can be read back (wandb offline)."""
from pathlib import Path

import pytest

from open_clip_train.demo_data import generate
from open_clip_train.main import main


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    generate(root, num_train=64, num_val=16, image_size=32, seed=1)
    return root


def test_tensorboard_and_wandb_offline(tiny_coco, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ann = tiny_coco / "annotations"
    rc = main([
        "--model", "tiny-convnext-cliptext", "--dataset-type", "coco",
        "--train-data", str(ann / "captions_train2017.json"), "--val-data", str(ann / "captions_val2017.json"),
        "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--warmup", "2", "--workers", "0",
        "--precision", "fp32", "--lock-image", "--unfreeze-image-at-epoch", "1", "--log-every-n-steps", "1",
        "--report-to", "tensorboard,wandb", "--coco-caption-sampling", "random", "--log-dir", str(tmp_path / "logs"), "--name", "rep",
    ])
    assert rc == 0
    run = tmp_path / "logs" / "rep"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "train/contrastive_loss" in tags
    assert "val/coco_i2t_R@1" in tags and "val/clip_val_loss" in tags
    # the lr of every param group, including the group created by the unlock at epoch 1
    assert "train/lr/base" in tags
    assert any(t.startswith("train/lr/unlock_image@1") for t in tags)
    visual = [e.value for e in acc.Scalars("train/trainable_visual")]
    assert visual[-1] > visual[0]  # the unlock is visible in the reported trainable counts
    assert len(acc.Scalars("train/contrastive_loss")) == 8  # 64 images (one caption each) / 16 per step x 2 epochs

    offline = list(Path(run).rglob("offline-run-*")) + list(tmp_path.rglob("offline-run-*"))
    assert offline, "wandb offline run directory not written"
    assert any(p.suffix == ".wandb" for d in offline for p in d.iterdir())
