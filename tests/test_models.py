"""Model configs, factory, GPT-2 tower and tokenizers."""
import math
import subprocess
import sys

import open_clip
import pytest
import torch
from torch import nn

from open_clip_train.models import (
    CausalTokenizer,
    GPT2TextTower,
    close_model_names,
    create_model,
    get_preprocess,
    get_tokenizer,
    list_models,
)

OUR_MODELS = [
    "convnextv2_tiny_gpt2-512",
    "convnextv2_tiny_cliptext-512",
    "convnext_base_w_absattn",
    "convnext_base_w_absattn_proj",
    "tiny-convnext-cliptext",
    "tiny-convnext-gpt2",
]
TINY_GPT2_CFG = dict(vocab_size=1024, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
EOS = 0


def numel(model: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def split_counts(model: nn.Module) -> tuple[int, int, int]:
    """(visual, text, total): text is everything outside visual.* except the logit scale/bias."""
    visual = numel(model, "visual.")
    text = sum(
        p.numel() for n, p in model.named_parameters()
        if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")
    )
    return visual, text, numel(model)


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    """Seed configs built once as shape-only skeletons: exact counts without 150M-param allocations."""
    return {name: create_model(name, device="meta")[0] for name in OUR_MODELS[:4]}


def test_configs_registered_with_open_clip():
    for name in OUR_MODELS:
        assert name in list_models()
        assert name in open_clip.list_models()
    assert "ViT-B-32" in list_models()


# `import open_clip_train` alone registers the configs (the README's promise), whichever of
# open_clip / open_clip_train is imported first; before open_clip is imported, importing
# open_clip_train must not pull it (or torch) in, so --help and the compare tool stay fast.
REGISTERED_AFTER_IMPORT = """
import sys
{imports}
{check_lazy}
import open_clip
assert "convnext_base_w_absattn" in open_clip.list_models(), "bundled configs not registered"
model = open_clip.create_model("tiny-convnext-cliptext")
assert type(model.visual.trunk).__name__ == "ConvNeXt" and model.visual.trunk.num_features == 64
"""


@pytest.mark.slow
@pytest.mark.parametrize("first", ["open_clip_train", "open_clip"])
def test_import_open_clip_train_registers_configs(first):
    if first == "open_clip_train":
        code = REGISTERED_AFTER_IMPORT.format(
            imports="import open_clip_train",
            check_lazy='assert "open_clip" not in sys.modules and "torch" not in sys.modules')
    else:
        code = REGISTERED_AFTER_IMPORT.format(imports="import open_clip\nimport open_clip_train", check_lazy="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_convnextv2_tiny_gpt2_counts(meta_models):
    model = meta_models["convnextv2_tiny_gpt2-512"]
    assert split_counts(model) == (30_070_400, 125_259_008, 155_329_409)
    assert numel(model, "visual.head.") == 2_203_904
    assert numel(model, "text.proj.") == 819_200
    proj = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("text.proj.")}
    assert proj == {"text.proj.0.weight": (640, 768), "text.proj.2.weight": (512, 640)}
    assert model.output_dict is True
    assert model.text.context_length == 77 and model.text.vocab_size == 50257


def test_convnextv2_tiny_cliptext_counts(meta_models):
    model = meta_models["convnextv2_tiny_cliptext-512"]
    visual, text, total = split_counts(model)
    assert (visual, text) == (30_070_400, 63_428_096)
    assert total == visual + text + 1
    top_level = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert top_level == {
        "visual", "token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
        "logit_scale",
    }


@pytest.mark.parametrize("name, head", [
    ("convnext_base_w_absattn", 3_856_000),
    ("convnext_base_w_absattn_proj", 4_265_600),
])
def test_convnext_base_w_absattn_heads(meta_models, name, head):
    model = meta_models[name]
    assert numel(model, "visual.head.") == head
    assert numel(model, "visual.head.pool.") == 3_856_000
    # pos-embed comes from timm's default pool_size (7x7 + 1 token), not from the 8x8 map at 256px
    assert tuple(model.visual.head.pool.pos_embed.shape) == (50, 1024)
    assert model.visual.image_size == (256, 256)


def test_convnext_base_w_absattn_is_checkpoint_compatible_with_upstream(meta_models):
    """Teacher (upstream convnext_base_w) and student differ only in the image head, and preprocess alike."""
    with torch.device("meta"):
        upstream = open_clip.create_model("convnext_base_w", device="meta")
    ours = meta_models["convnext_base_w_absattn"]
    up_shapes = {k: tuple(v.shape) for k, v in upstream.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    shared = up_shapes.keys() & our_shapes.keys()
    assert all(up_shapes[k] == our_shapes[k] for k in shared)
    assert set(up_shapes) - set(our_shapes) == {"visual.head.proj.weight"}
    assert all(k.startswith("visual.head.pool.") for k in set(our_shapes) - set(up_shapes))
    assert ours.visual.preprocess_cfg == upstream.visual.preprocess_cfg


@pytest.fixture(scope="module")
def tiny_batch() -> torch.Tensor:
    return torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-convnext-cliptext", "tiny-convnext-gpt2"])
def test_tiny_forward(name, tiny_batch, gpt2_tokenizer_dir):
    model, _ = create_model(name)
    tokenizer = get_tokenizer(name, text_tokenizer=str(gpt2_tokenizer_dir))
    text = tokenizer([f"a photo of {i} dogs" for i in range(16)])
    assert text.shape == (16, 32)
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch, text)
    for key in ("image_features", "text_features"):
        feats = out[key]
        assert feats.shape == (16, 64)
        assert torch.isfinite(feats).all()
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(16))
    assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(tiny_batch, normalize=True), out["image_features"])
        torch.testing.assert_close(model.encode_text(text, normalize=True), out["text_features"])


@pytest.mark.parametrize("name", ["tiny-convnext-cliptext", "tiny-convnext-gpt2"])
def test_tiny_train_step_backprops_everywhere(name, tiny_batch):
    model, _ = create_model(name)
    text = torch.randint(1, 1000, (16, 32))
    text[:, 20] = EOS  # GPT-2 pools here; CLIP text pools at each row's argmax id
    out = model(tiny_batch, text)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    loss = nn.functional.cross_entropy(logits, torch.arange(16))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_tiny_gpt2_preprocess_cfg_matches_clip_variant():
    gpt2, _ = create_model("tiny-convnext-gpt2")
    clip, _ = create_model("tiny-convnext-cliptext")
    assert gpt2.visual.preprocess_cfg == clip.visual.preprocess_cfg
    assert gpt2.visual.preprocess_cfg["size"] == (64, 64)


def test_get_preprocess_train_eval_and_no_augment():
    from PIL import Image
    import torchvision.transforms as T

    model, _ = create_model("tiny-convnext-cliptext")
    image = Image.new("RGB", (100, 80), color=(200, 30, 40))
    train = get_preprocess(model, is_train=True)
    evaluate = get_preprocess(model, is_train=False)
    plain = get_preprocess(model, is_train=True, no_augment=True)
    assert any(isinstance(t, T.RandomResizedCrop) for t in train.transforms)
    assert not any(isinstance(t, T.RandomResizedCrop) for t in plain.transforms)
    assert train(image).shape == evaluate(image).shape == (3, 64, 64)
    torch.testing.assert_close(plain(image), evaluate(image))


def test_precision_follows_open_clip():
    amp, _ = create_model("tiny-convnext-gpt2", precision="amp")
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    for name in ("tiny-convnext-gpt2", "tiny-convnext-cliptext"):
        bf16, _ = create_model(name, precision="pure_bf16")
        assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with pytest.raises(ValueError, match="precision"):
        create_model("tiny-convnext-gpt2", precision="fp8")


def test_unknown_model_suggests_close_names():
    assert "convnextv2_tiny_gpt2-512" in close_model_names("convnextv2_tiny_gpt2")
    assert close_model_names("convnext_base_w_absatn", n=1) == ["convnext_base_w_absattn"]
    with pytest.raises(ValueError, match="convnext_base_w_absattn"):
        create_model("convnext_base_w_absatn")


# --- GPT-2 tower -------------------------------------------------------------------------------


def tiny_tower(**gpt2_overrides) -> GPT2TextTower:
    torch.manual_seed(0)
    return GPT2TextTower({**TINY_GPT2_CFG, **gpt2_overrides}, output_dim=48, context_length=16).eval()


def test_gpt2_pools_at_first_eos():
    tower = tiny_tower()
    caption = [5, 6, 7, 8]
    a = torch.tensor([caption + [EOS] + [EOS] * 11])
    b = torch.tensor([caption + [EOS] + [9, 10, EOS, 300, 301, 302, 7, 7, 7, 7, 7]])
    with torch.no_grad():
        out_a, out_b = tower(a), tower(b)
        # reference: run only the caption + EOS prefix and take its last hidden state
        ref = tower.proj(tower.transformer(torch.tensor([caption + [EOS]])).last_hidden_state[:, -1])
    assert out_a.shape == (1, 48)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(out_a, ref)


def test_gpt2_rows_without_eos_use_last_position():
    tower = tiny_tower()
    tokens = torch.arange(1, 17)[None]
    assert tower.first_eos_index(torch.cat([tokens, tokens.clone().index_fill_(1, torch.tensor([3]), EOS)])).tolist() \
        == [15, 3]
    with torch.no_grad():
        ref = tower.proj(tower.transformer(tokens).last_hidden_state[:, -1])
        torch.testing.assert_close(tower(tokens), ref)


def test_gpt2_layer_groups_cover_backbone_in_order():
    tower = tiny_tower(n_layer=3)
    groups = tower.layer_groups()
    assert len(groups) == 4
    assert groups[0] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert all(n.startswith("transformer.h.1.") for n in groups[2])
    assert groups[-1][-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    flat = [n for g in groups for n in g]
    backbone = [n for n, _ in tower.named_parameters() if not n.startswith("proj.")]
    assert sorted(flat) == sorted(backbone) and len(flat) == len(set(flat))


def test_gpt2_grad_checkpointing_matches_plain_backward():
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tokens = torch.tensor([[5, 6, 7, EOS] + [EOS] * 12, [9] * 16])

    def grads(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        tower = tiny_tower(**no_dropout).train()
        tower.set_grad_checkpointing(checkpointing)
        out = tower(tokens)
        out.square().sum().backward()
        return out.detach(), tower.transformer.h[0].attn.c_attn.weight.grad

    (out_plain, g_plain), (out_ckpt, g_ckpt) = grads(False), grads(True)
    torch.testing.assert_close(out_plain, out_ckpt)
    torch.testing.assert_close(g_plain, g_ckpt)


def test_gpt2_tower_rejects_context_beyond_positions():
    with pytest.raises(ValueError, match="n_positions"):
        GPT2TextTower(TINY_GPT2_CFG, output_dim=8, context_length=65)


# --- tokenizers --------------------------------------------------------------------------------


def test_causal_tokenizer_appends_eos_pads_and_truncates(gpt2_tokenizer_dir):
    tok = get_tokenizer("tiny-convnext-gpt2", text_tokenizer=str(gpt2_tokenizer_dir))
    assert isinstance(tok, CausalTokenizer)
    assert (tok.eos_token_id, tok.pad_token_id) == (EOS, EOS)  # no pad token: pad with EOS
    ids = tok.tokenizer.encode("a dog on the beach", add_special_tokens=False)
    out = tok(["a dog on the beach", "a dog   on the beach"])
    assert out.dtype == torch.long and out.shape == (2, 32)
    expected = ids + [EOS] * (32 - len(ids))
    assert out[0].tolist() == expected and out[1].tolist() == expected
    long_text = " ".join(["three horses looking at a wooden bench"] * 20)
    long_ids = tok.tokenizer.encode(long_text, add_special_tokens=False)
    truncated = tok(long_text)[0].tolist()
    assert truncated == long_ids[:31] + [EOS]
    assert tok("a dog", context_length=8).shape == (1, 8)


def test_causal_tokenizer_errors(gpt2_tokenizer_dir):
    with pytest.raises(ValueError, match="--text-tokenizer"):
        get_tokenizer("tiny-convnext-gpt2")
    with pytest.raises(ValueError, match="vocab_size"):
        CausalTokenizer(str(gpt2_tokenizer_dir), context_length=16, model_vocab_size=500)
    # the tiny tokenizer's EOS is id 0; the GPT-2 base config pools at 50256
    with pytest.raises(ValueError, match="eos id"):
        get_tokenizer("convnextv2_tiny_gpt2-512", text_tokenizer=str(gpt2_tokenizer_dir))


def test_clip_text_tokenizer_uses_config_context():
    tok = get_tokenizer("tiny-convnext-cliptext")
    out = tok(["a dog", "a cat on a mat"])
    assert out.shape == (2, 32)
    assert (out.argmax(dim=1) > 0).all()  # EOT (highest id) present in every row
    assert get_tokenizer("convnextv2_tiny_cliptext-512")("a dog").shape == (1, 77)
