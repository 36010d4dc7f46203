"""--torchcompile: the whole model compiled (graphs traced), same losses and weights as eager on
a tiny model, recompiled at an unlock, and exclusive with --compile-frozen on."""
import re

import pytest
import torch

import open_clip_train.models  # noqa: F401  registers the tiny configs
from open_clip_train.main import main

pytestmark = pytest.mark.slow

BASE = ["--model", "tiny-convnext-cliptext", "--dataset-type", "synthetic", "--train-num-samples", "8",
        "--batch-size", "4", "--precision", "fp32", "--workers", "0", "--warmup", "1", "--lr", "1e-3",
        "--opt", "timm/momentum", "--momentum", "0", "--seed", "0", "--log-every-n-steps", "1",
        "--lock-image", "--unfreeze-image-at-epoch", "1", "--epochs", "2"]


def _losses(run):
    return [float(v) for v in re.findall(r"Contrastive_loss: ([-+0-9.eE]+)", (run / "out.log").read_text())]


def test_same_losses_and_weights_as_eager_and_recompiles_at_unlock(tmp_path):
    from torch._dynamo.utils import counters

    assert main(BASE + ["--log-dir", str(tmp_path), "--name", "eager"]) == 0
    counters.clear()
    assert main(BASE + ["--torchcompile", "--log-dir", str(tmp_path), "--name", "compiled"]) == 0
    assert counters["stats"]["unique_graphs"] >= 2  # traced before and after the unlock
    log = (tmp_path / "compiled" / "out.log").read_text()
    assert "torch.compile: whole model compiled" in log and "recompiles at the next step" in log
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
    a, b = (torch.load(tmp_path / n / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=True)["state_dict"]
            for n in ("eager", "compiled"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


def test_with_compile_frozen_on_is_one_line(tmp_path, capfd):
    code = main(BASE + ["--torchcompile", "--compile-frozen", "on", "--log-dir", str(tmp_path), "--name", "x"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --torchcompile compiles the whole model, its frozen trunk included; "
                                 "drop --compile-frozen"]
