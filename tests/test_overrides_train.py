"""Upstream's --force-* / --image-* / --aug-cfg reach the trainer: the model it builds, its
tokenizer, the train/eval transforms (zero-shot's too), params.txt; a value the model cannot
take is one line before any work."""
import re

import pytest
import torch

import open_clip
import open_clip_train.models  # noqa: F401  registers the tiny configs
from open_clip_train.cli_config import config_from_args
from open_clip_train.distributed import World
from open_clip_train.main import main
from open_clip_train.params import parse_args
from open_clip_train.trainer import Trainer

MODEL = "tiny-convnext-cliptext"
BASE = ["--model", MODEL, "--dataset-type", "synthetic", "--train-num-samples", "4", "--batch-size", "2",
        "--precision", "fp32", "--workers", "0", "--warmup", "1", "--lr", "1e-3", "--epochs", "1"]
OVERRIDES = ["--force-custom-text", "--force-quick-gelu", "--force-context-length", "20", "--force-image-size", "48",
             "--image-mean", "0.5", "0.4", "0.3", "--image-std", "0.2", "--image-interpolation", "bilinear",
             "--image-resize-mode", "squash", "--aug-cfg", "scale=(0.5,0.7)"]


def _r(t) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", repr(t))


def test_trainer_builds_what_upstreams_call_builds(tmp_path):
    cfg = config_from_args(parse_args(BASE + OVERRIDES + ["--log-dir", "none"]))
    trainer = Trainer.build(cfg, World(), torch.device("cpu"), None)
    ref, ref_train, ref_val = open_clip.create_model_and_transforms(
        MODEL, force_custom_text=True, force_quick_gelu=True, force_context_length=20, force_image_size=48,
        image_mean=(0.5, 0.4, 0.3), image_std=(0.2,), image_interpolation="bilinear", image_resize_mode="squash",
        aug_cfg={"scale": (0.5, 0.7)})
    m = trainer.model
    assert type(m).__name__ == "CustomTextCLIP" and m.text.context_length == 20
    assert isinstance(m.text.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    train, val = trainer.preprocess
    assert _r(train) == _r(ref_train) and _r(val) == _r(ref_val)
    assert "scale=(0.5, 0.7)" in _r(train) and "bilinear" in _r(val)
    assert trainer.tokenizer(["a cat"]).shape == (1, 20)


def test_training_run_records_and_uses_them(tmp_path):
    code = main(BASE + OVERRIDES + ["--log-dir", str(tmp_path), "--name", "ov"])
    assert code == 0
    params = (tmp_path / "ov" / "params.txt").read_text()
    assert "force_context_length: 20" in params and "image_mean: [0.5, 0.4, 0.3]" in params
    assert "aug_cfg: {'scale': (0.5, 0.7)}" in params
    sd = torch.load(tmp_path / "ov" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert sd["text.positional_embedding"].shape[0] == 20


@pytest.mark.parametrize("extra, message", [
    (["--force-patch-dropout", "0.1"], "--force-patch-dropout: the image trunk"),
    (["--aug-cfg", "nope=1"], "--aug-cfg: unknown key(s) nope"),
    (["--aug-cfg", "re_prob=0.5"], "only used with use_timm=True"),
    (["--image-mean", "0.5", "0.5"], "--image-mean: give 1 value"),
])
def test_overrides_the_model_cannot_take_are_one_line_errors(tmp_path, capfd, extra, message):
    code = main(BASE + extra + ["--log-dir", str(tmp_path), "--name", "bad"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()
