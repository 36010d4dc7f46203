"""Causal text towers run on the batch's prefix up to its last EOS (models/text_trim.py): same
features and gradients as the full context, fewer positions through the transformer."""
from pathlib import Path

import pytest
import torch

from open_clip.model import CLIP
from open_clip_train.models import create_model, get_tokenizer
from open_clip_train.models.text_trim import (ROUND, caller_trims, host_prefix_length, prefix_length,
                                              set_text_padding_trim, text_padding_trim)
from open_clip_train.params import parse_args

CAPTIONS = ["a dog", "two red squares and a small blue circle", "x", "a cat on a mat"]


def _tower_and_input(model):
    """The module whose input sequence length the trim changes."""
    return model.transformer if isinstance(model, CLIP) else model.text.transformer


def _run(model, text):
    """Features and text-tower grads, plus the sequence lengths the transformer saw."""
    seen = []
    tower = _tower_and_input(model)
    hook = tower.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    model.zero_grad()
    feats = model.encode_text(text, normalize=True)
    (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return feats.detach(), grads, seen


@pytest.mark.parametrize("name", ["tiny-convnext-cliptext", "tiny-convnext-gpt2"])
def test_trimmed_text_gives_the_full_length_features_and_gradients(name, gpt2_tokenizer_dir):
    torch.manual_seed(0)
    model, _ = create_model(name)
    model.eval()
    text = get_tokenizer(name, text_tokenizer=str(gpt2_tokenizer_dir))(CAPTIONS)
    assert text.shape[1] == 32 and text_padding_trim(model)
    trimmed, g_trim, seen_trim = _run(model, text)
    set_text_padding_trim(model, False)
    full, g_full, seen_full = _run(model, text)
    assert seen_full == [32]
    assert seen_trim[0] < 32 and seen_trim[0] % ROUND == 0  # the padding after the last EOS was skipped
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
    assert g_trim.keys() == g_full.keys() and any(k.endswith("token_embedding.weight") or "wte" in k for k in g_trim)
    for k in g_full:
        torch.testing.assert_close(g_trim[k], g_full[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["tiny-convnext-cliptext", "tiny-convnext-gpt2"])
def test_the_prefix_found_on_the_host_gives_the_towers_own_trim_without_a_read(name, gpt2_tokenizer_dir):
    """The trainer's path: host_prefix_length on the batch's host copy, the sliced tokens to the
    tower inside caller_trims. Same sequence length, features and gradients as the tower's own
    trim, and the tower reads nothing from its input (on a GPU, a wait for the queued kernels)."""
    import transformers
    from test_host_reads import TORCH_DIR, HostReads

    # transformers' GPT-2 itself reads its position ids each forward (a packed-sequence check that
    # only a prepared 4D mask skips): not ours to remove, so not counted here
    ignore = (TORCH_DIR, str(Path(transformers.__file__).parent))

    torch.manual_seed(0)
    model, _ = create_model(name)
    model.eval()
    text = get_tokenizer(name, text_tokenizer=str(gpt2_tokenizer_dir))(CAPTIONS)
    own, g_own, seen_own = _run(model, text)
    n = host_prefix_length([model], text)
    assert [n] == seen_own and n < 32
    with caller_trims([model]), HostReads(ignore) as reads:
        host, g_host, seen_host = _run(model, text[:, :n])
    assert seen_host == [n] and reads.seen == []
    torch.testing.assert_close(host, own, rtol=0, atol=0)
    assert g_host.keys() == g_own.keys()
    for k in g_own:
        torch.testing.assert_close(g_host[k], g_own[k], rtol=0, atol=0, msg=k)
    # outside the context the tower trims by itself again; a tower that does not trim: no prefix
    assert not any(m.caller_trimmed for m in (model, getattr(model, "text", None)) if hasattr(m, "caller_trimmed"))
    set_text_padding_trim(model, False)
    assert host_prefix_length([model], text) is None


def test_a_caption_filling_the_context_keeps_the_full_length():
    model, _ = create_model("tiny-convnext-cliptext")
    tok = get_tokenizer("tiny-convnext-cliptext")
    text = tok(["a dog", " ".join(["word"] * 60)])  # truncated: its EOT sits at the last position
    _, _, seen = _run(model, text)
    assert seen == [32]


def test_prefix_length_rounds_up_and_caps():
    assert prefix_length(torch.tensor([0, 3]), 77) == 8
    assert prefix_length(torch.tensor([7]), 77) == 8
    assert prefix_length(torch.tensor([8]), 77) == 16
    assert prefix_length(torch.tensor([75]), 77) == 77


def test_trimming_needs_a_causal_mask_and_eos_pooling():
    model, _ = create_model("tiny-convnext-cliptext")
    text = get_tokenizer("tiny-convnext-cliptext")(CAPTIONS)
    model.text_pool_type = "last"  # pools the final position: every position matters
    assert _run(model, text)[2] == [32]
    model.text_pool_type = "argmax"
    model.attn_mask = None  # bidirectional: later tokens change earlier outputs
    assert _run(model, text)[2] == [32]


def test_the_trimming_class_keeps_the_state_dict_and_the_flag_turns_it_off():
    model, _ = create_model("tiny-convnext-cliptext")
    assert isinstance(model, CLIP) and type(model) is not CLIP
    torch.manual_seed(0)
    plain = CLIP(**{k: v for k, v in __import__("open_clip").get_model_config("tiny-convnext-cliptext").items()})
    assert list(model.state_dict()) == list(plain.state_dict())
    assert parse_args(["--model", "m"]).trim_text_padding is True
    assert parse_args(["--model", "m", "--no-trim-text-padding"]).trim_text_padding is False
