"""Upstream v3.3.0's tests/test_training_simple.py cases, run against this trainer's `main`.

Upstream's versions only check that nothing raised. These check the exit code and the
checkpoint: epoch and step counts, the state dict against a freshly built model, the trainable
set against upstream's own `lock_image_tower`, that the locked weights did not move and the
trainable ones did (the trainer seeds with --seed before building the model, as upstream's
`random_seed(args.seed, 0)`, so the initial weights can be rebuilt here), and finite losses.

Same command lines as upstream's, smaller: 4 samples at batch 2 (upstream: 16 at batch 4),
fp32 (upstream's default amp is bf16 autocast on a CPU, much slower there). The mt5 case needs
the model hub and is left out.
"""
import re

import numpy as np
import pytest
import torch

import open_clip_train.models  # noqa: F401  registers our configs
from open_clip_train.main import main

pytestmark = pytest.mark.slow

UPSTREAM = ["--save-frequency", "1", "--zeroshot-frequency", "1", "--dataset-type", "synthetic",
            "--warmup", "1", "--lr", "1e-3", "--wd", "0.1", "--epochs", "1", "--workers", "2"]
SMALL = ["--train-num-samples", "4", "--batch-size", "2", "--precision", "fp32"]


def _run(tmp_path, name, extra):
    code = main(UPSTREAM + SMALL + ["--log-dir", str(tmp_path), "--name", name] + extra)
    return code, tmp_path / name


def _initial(model_name):
    """The weights the trainer starts from: its seeding (seed 0, rank 0), then the model."""
    import random

    from open_clip_train.models import create_model

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model, _ = create_model(model_name, precision="fp32")
    return model


def _checkpoint(run, model_name, steps):
    ck = torch.load(run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == steps and ck["name"] == run.name and ck["model"] == model_name
    return ck


def _losses(run):
    values = [float(v) for v in re.findall(r"Contrastive_loss: ([-+0-9.eEinfa]+)", (run / "out.log").read_text())]
    assert values and all(np.isfinite(values)), values
    return values


def _check_weights(ck, init, trainable):
    sd = ck["state_dict"]
    ref = init.state_dict()
    assert sd.keys() == ref.keys()
    assert all(sd[k].shape == ref[k].shape for k in sd)
    names = {n for g in ck["param_groups"] for n in g["param_names"]}
    assert names == trainable
    assert len(ck["optimizer"]["state"]) == len(trainable)  # every trainable tensor took a step
    params = dict(init.named_parameters())
    frozen = set(params) - trainable
    assert all(torch.equal(sd[n], params[n].detach()) for n in frozen), "a locked weight moved"
    moved = [n for n in trainable if not torch.equal(sd[n], params[n].detach())]
    assert len(moved) >= 0.9 * len(trainable), f"only {len(moved)} of {len(trainable)} trainable tensors changed"


def test_training_rn50(tmp_path):
    code, run = _run(tmp_path, "rn50", ["--model", "RN50"])
    assert code == 0
    init = _initial("RN50")
    _check_weights(_checkpoint(run, "RN50", steps=2), init, {n for n, _ in init.named_parameters()})
    _losses(run)


def test_training_unfreezing_vit_with_accum(tmp_path):
    """--lock-image --lock-image-unlocked-groups 5 --accum-freq 2: one step of 2 x 2 samples;
    the trainable set is exactly what upstream's lock_image_tower(unlocked_groups=5) leaves."""
    extra = ["--model", "ViT-B-32", "--lock-image", "--lock-image-unlocked-groups", "5", "--accum-freq", "2"]
    code, run = _run(tmp_path, "vit", extra)
    assert code == 0
    init = _initial("ViT-B-32")
    upstream = _initial("ViT-B-32")
    upstream.lock_image_tower(unlocked_groups=5, freeze_bn_stats=False)
    trainable = {n for n, p in upstream.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.8.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.7.") for n in trainable)
    _check_weights(_checkpoint(run, "ViT-B-32", steps=1), init, trainable)
    _losses(run)


def test_training_coca(tmp_path):
    """CoCa trains with the contrastive and caption losses (--coca-*-loss-weight); its text
    decoder is trainable."""
    code, run = _run(tmp_path, "coca", ["--model", "coca_ViT-B-32", "--coca-caption-loss-weight", "2",
                                         "--coca-contrastive-loss-weight", "1"])
    assert code == 0
    init = _initial("coca_ViT-B-32")
    _check_weights(_checkpoint(run, "coca_ViT-B-32", steps=2), init, {n for n, _ in init.named_parameters()})
    _losses(run)
    captions = re.findall(r"Caption_loss: ([-+0-9.eE]+)", (run / "out.log").read_text())
    assert captions and all(np.isfinite(float(c)) for c in captions)


def test_coca_decoder_projection_is_initialised_not_left_empty():
    """open_clip 3.3 makes the CoCa decoder's text_projection with torch.empty and never initialises
    it (zeros or leftover memory: here once a 1e31 caption loss, a non-finite first step).
    Built here, it holds normal(0, width^-0.5) values, the same for the same seed."""
    from open_clip_train.models import create_model

    garbage = torch.full((512, 512), 1e31)  # leave such values in memory torch.empty may reuse
    del garbage
    built = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _ = create_model("coca_ViT-B-32")
        built.append(model.text_decoder.text_projection.detach().clone())
    width = model.text_decoder.width
    assert torch.equal(built[0], built[1]) and torch.isfinite(built[0]).all()
    assert abs(float(built[0].std()) - width ** -0.5) < 0.1 * width ** -0.5


@pytest.mark.parametrize("extra, what", [(["--accum-freq", "2"], "with --accum-freq is not supported"),
                                         (["--headalign"],
                                          "with --distill / --teacher-cache / --headalign is not supported")])
def test_coca_refusals_are_one_line(tmp_path, capfd, extra, what):
    """What CoCa does not train with here: one line, exit 2, no run directory."""
    code, run = _run(tmp_path, "coca", ["--model", "coca_ViT-B-32"] + extra)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --model coca_ViT-B-32 (CoCa) ") and what in err[0]
    assert not run.exists()


def test_torchscript_is_refused_in_one_line(tmp_path, capfd):
    """Upstream trains a torch.jit.script-ed model; here --torchscript is refused before any work
    (TorchScript is deprecated in PyTorch in favour of torch.compile, and scripting cannot go
    through the text-trim and frozen-trunk wrappers)."""
    code, run = _run(tmp_path, "ts", ["--model", "ViT-B-32", "--lock-image", "--lock-image-unlocked-groups", "5",
                                       "--torchscript"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: --torchscript: TorchScript is not supported by this trainer (deprecated in PyTorch, and a "
                   "scripted model cannot carry the text trim and frozen-trunk wrappers); use --torchcompile"]
    assert not run.exists()


@pytest.mark.parametrize("flags, why", [(["--horovod"], "torchrun / SLURM"), (["--use-bnb-linear", "x"], "CUDA-only"),
                                        (["--trace"], "--torchcompile"), (["--dist-url", "tcp://h:1"], "torchrun")])
def test_other_upstream_flags_are_refused_with_the_reason(tmp_path, capfd, flags, why):
    code, run = _run(tmp_path, "refused", ["--model", "tiny-convnext-cliptext"] + flags)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {flags[0]}: ") and "not supported by this trainer" in err[0] and why in err[0]
    assert not run.exists()
