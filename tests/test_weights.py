"""Weight loading in every supported format, and LoadReport's account of what did not load."""
import logging
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from open_clip_train.models import LoadReport, create_model

GPT2_TINY = "tiny-convnext-gpt2"
CLIP_TINY = "tiny-convnext-cliptext"


def assert_same_tensors(expected: dict[str, torch.Tensor], model: nn.Module, prefix: str = "") -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[prefix + key], value), prefix + key


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(**open_clip.get_model_config(GPT2_TINY)["text_cfg"]["gpt2"])


def save_full(state: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt_raw":
        torch.save(state, path)
    elif fmt == "pt_ddp":  # trainer-style checkpoint of a DDP-wrapped model
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "pt_compiled":  # DDP around torch.compile
        torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)
    else:
        raise AssertionError(fmt)


@pytest.mark.parametrize("name", [CLIP_TINY, GPT2_TINY])
@pytest.mark.parametrize("fmt, suffix", [
    ("pt_raw", ".pt"), ("pt_ddp", ".bin"), ("pt_compiled", ".pt"), ("safetensors", ".safetensors"),
])
def test_full_checkpoint_round_trip(tmp_path, name, fmt, suffix):
    source, _ = create_model(name)
    with torch.no_grad():
        source.logit_scale.fill_(2.5)  # differs from the init value, so loading it is observable
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"ckpt{suffix}"
    save_full(expected, path, fmt)

    model, report = create_model(name, pretrained=str(path))
    assert_same_tensors(expected, model)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    assert report.source == str(path)
    assert report.summary_lines() == []


def test_timm_trunk_safetensors(tmp_path):
    trunk = timm.create_model("test_convnext")  # keeps its 1000-class classifier
    path = tmp_path / "test_convnext.safetensors"
    save_file(trunk.state_dict(), str(path))

    model, report = create_model(GPT2_TINY, pretrained_image=True, pretrained_image_path=str(path))
    expected = {k: v for k, v in trunk.state_dict().items() if not k.startswith("head.fc.")}
    assert_same_tensors(expected, model, prefix="visual.trunk.")
    assert sorted(report.unexpected) == ["visual.trunk.head.fc.bias", "visual.trunk.head.fc.weight"]
    assert not any(k.startswith("visual.trunk.") for k in report.missing)
    lines = report.summary_lines()
    assert "unused: visual.trunk.head.fc.* (65,000 params)" in lines
    assert "new: visual.head.* (18,304 params)" in lines
    assert any(line.startswith("new: text.*") for line in lines)


def test_pretrained_image_without_path_explains_offline():
    with pytest.raises(ValueError, match="--pretrained-image-path"):
        create_model(GPT2_TINY, pretrained_image=True)


def test_gpt2_hf_directory(tmp_path):
    torch.manual_seed(1)
    gpt2 = GPT2Model(tiny_gpt2_config())
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    assert (tmp_path / "gpt2" / "model.safetensors").is_file()

    model, report = create_model(GPT2_TINY, pretrained_text_path=str(tmp_path / "gpt2"))
    assert_same_tensors(gpt2.state_dict(), model, prefix="text.transformer.")
    assert report.unexpected == [] and report.mismatched == []
    assert not any(k.startswith("text.transformer.") for k in report.missing)
    assert "new: text.proj.* (8,192 params)" in report.summary_lines()


def test_gpt2_lm_head_safetensors_file(tmp_path):
    torch.manual_seed(2)
    lm = GPT2LMHeadModel(tiny_gpt2_config())
    # lm_head is tied to wte; safetensors refuses shared storage, so save a copy as a raw export would
    state = {k: v.clone().contiguous() for k, v in lm.state_dict().items()}
    assert "lm_head.weight" in state and "transformer.h.0.attn.c_attn.weight" in state
    # causal-mask buffers that checkpoints of older transformers versions carry
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))

    model, report = create_model(GPT2_TINY, pretrained_text_path=str(path))
    assert_same_tensors(lm.transformer.state_dict(), model, prefix="text.transformer.")
    assert report.unexpected == [] and report.mismatched == []


def test_text_path_overrides_full_checkpoint(tmp_path):
    source, _ = create_model(GPT2_TINY)
    full = tmp_path / "full.safetensors"
    save_file(source.state_dict(), str(full))
    torch.manual_seed(3)
    gpt2 = GPT2Model(tiny_gpt2_config())
    gpt2.save_pretrained(str(tmp_path / "gpt2"))

    model, report = create_model(GPT2_TINY, pretrained=str(full), pretrained_text_path=str(tmp_path / "gpt2"))
    assert_same_tensors(gpt2.state_dict(), model, prefix="text.transformer.")
    assert_same_tensors({k: v for k, v in source.state_dict().items() if k.startswith("visual.")}, model)
    assert report.missing == []
    assert report.source == f"{full}, {tmp_path / 'gpt2'}"


def test_text_path_rejected_for_clip_text(tmp_path):
    GPT2Model(tiny_gpt2_config()).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="GPT-2"):
        create_model(CLIP_TINY, pretrained_text_path=str(tmp_path / "gpt2"))


def linear_head_tiny_checkpoint() -> nn.Module:
    """Upstream convnext_base_w's head (timm default pool + linear proj) on the tiny config."""
    cfg = open_clip.get_model_config(CLIP_TINY)
    cfg["vision_cfg"].update(timm_pool="", timm_proj="linear")
    return open_clip.model.CLIP(**cfg)


def test_report_groups_head_swap(tmp_path):
    source = linear_head_tiny_checkpoint()
    path = tmp_path / "linear_head.pt"
    torch.save(source.state_dict(), path)

    model, report = create_model(CLIP_TINY, pretrained=str(path))
    assert report.summary_lines() == [
        "new: visual.head.pool.* (18,304 params)",
        "unused: visual.head.proj.* (4,096 params)",
    ]
    assert_same_tensors({k: v for k, v in source.state_dict().items() if k != "visual.head.proj.weight"}, model)


def test_shape_mismatch_is_skipped_and_reported(tmp_path, caplog):
    source, _ = create_model(CLIP_TINY)
    state = dict(source.state_dict())
    state["visual.head.pool.pos_embed"] = torch.zeros(50, 64)  # a 7x7 pool_size checkpoint
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path))

    model, report = create_model(CLIP_TINY, pretrained=str(path))
    assert report.mismatched == [("visual.head.pool.pos_embed", (50, 64), (26, 64))]
    assert report.missing == ["visual.head.pool.pos_embed"]
    assert report.summary_lines() == [
        "new: visual.head.pool.pos_embed (1,664 params)",
        "shape mismatch: visual.head.pool.pos_embed (checkpoint [50, 64] vs model [26, 64])",
    ]
    assert_same_tensors({k: v for k, v in state.items() if k != "visual.head.pool.pos_embed"}, model)
    with caplog.at_level(logging.INFO, logger="test"):
        report.log(logging.getLogger("test"))
    assert any(r.levelno == logging.WARNING and "shape mismatch" in r.getMessage() for r in caplog.records)


def test_random_init_report_lists_everything_as_new(caplog):
    model, report = create_model(GPT2_TINY)
    assert report.source == "" and set(report.missing) == set(model.state_dict())
    assert report.summary_lines() == [  # state_dict order: a module's own params precede its children's
        "new: logit_scale (1 param)",
        "new: visual.* (225,432 params)",
        "new: text.* (177,920 params)",
    ]
    with caplog.at_level(logging.INFO, logger="test"):
        report.log(logging.getLogger("test"))
    assert "initialised randomly" in caplog.text


def test_summary_collapses_only_fully_covered_subtrees():
    counts = {"a.x.weight": 4, "a.x.bias": 2, "a.y.weight": 3, "b.weight": 1}
    lines = lambda missing: LoadReport(missing=missing).summary_lines(counts)  # noqa: E731
    assert lines(["a.x.weight", "a.x.bias", "a.y.weight"]) == ["new: a.* (9 params)"]
    assert lines(["a.x.weight", "a.x.bias"]) == ["new: a.x.* (6 params)"]
    assert lines(["a.x.weight", "b.weight"]) == ["new: a.x.weight (4 params)", "new: b.* (1 param)"]


def test_summary_groups_mismatched_subtrees():
    counts = {"a.x.weight": 4, "a.x.bias": 2, "b.weight": 3}
    report = LoadReport(mismatched=[("a.x.weight", (2, 2), (4,)), ("a.x.bias", (1,), (2,))])
    assert report.summary_lines(counts) == ["shape mismatch: a.* (6 params in the model)"]
