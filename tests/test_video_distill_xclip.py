"""X-CLIP teacher: a tiny checkpoint in the public code's key layout, checked against a
hand-written reference of the whole forward (ViT, text, temporal transformer, loose similarity)."""
import math

import pytest
import torch
import torch.nn.functional as F

from open_clip_train.video.teacher import VideoFeatures
from open_clip_train.video.xclip import XClipTeacher

WIDTH, LAYERS, PATCH, IMAGE, CTX, VOCAB, EMBED = 128, 2, 8, 32, 16, 40, 128
HEADS = WIDTH // 64  # 2: exercises the per-head mask expansion
T_FRAMES, W_WORDS, POSITIONS, TEMPORAL_LAYERS = 4, 6, 16, 2


def _block(sd, p, w, g):
    sd.update({
        p + "ln_1.weight": 1 + 0.1 * torch.randn(w, generator=g), p + "ln_1.bias": 0.1 * torch.randn(w, generator=g),
        p + "attn.in_proj_weight": 0.1 * torch.randn(3 * w, w, generator=g),
        p + "attn.in_proj_bias": 0.1 * torch.randn(3 * w, generator=g),
        p + "attn.out_proj.weight": 0.1 * torch.randn(w, w, generator=g),
        p + "attn.out_proj.bias": 0.1 * torch.randn(w, generator=g),
        p + "ln_2.weight": 1 + 0.1 * torch.randn(w, generator=g), p + "ln_2.bias": 0.1 * torch.randn(w, generator=g),
        p + "mlp.c_fc.weight": 0.1 * torch.randn(4 * w, w, generator=g),
        p + "mlp.c_fc.bias": 0.1 * torch.randn(4 * w, generator=g),
        p + "mlp.c_proj.weight": 0.1 * torch.randn(w, 4 * w, generator=g),
        p + "mlp.c_proj.bias": 0.1 * torch.randn(w, generator=g),
    })


def tiny_xclip_state(seed=0, temporal=True):
    """Random weights under X-CLIP's checkpoint keys; the learned matrices eye + noise (not
    symmetric, so a transposed use of any of them changes the result)."""
    g = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    sd = {
        "clip.visual.conv1.weight": 0.1 * torch.randn(WIDTH, 3, PATCH, PATCH, generator=g),
        "clip.visual.class_embedding": 0.1 * torch.randn(WIDTH, generator=g),
        "clip.visual.positional_embedding": 0.1 * torch.randn(grid * grid + 1, WIDTH, generator=g),
        "clip.visual.ln_pre.weight": 1 + 0.1 * torch.randn(WIDTH, generator=g),
        "clip.visual.ln_pre.bias": 0.1 * torch.randn(WIDTH, generator=g),
        "clip.visual.ln_post.weight": 1 + 0.1 * torch.randn(WIDTH, generator=g),
        "clip.visual.ln_post.bias": 0.1 * torch.randn(WIDTH, generator=g),
        "clip.visual.proj": 0.1 * torch.randn(WIDTH, EMBED, generator=g),
        "clip.token_embedding.weight": 0.1 * torch.randn(VOCAB, WIDTH, generator=g),
        "clip.positional_embedding": 0.1 * torch.randn(CTX, WIDTH, generator=g),
        "clip.ln_final.weight": 1 + 0.1 * torch.randn(WIDTH, generator=g),
        "clip.ln_final.bias": 0.1 * torch.randn(WIDTH, generator=g),
        "clip.text_projection": 0.1 * torch.randn(WIDTH, EMBED, generator=g),
        "clip.logit_scale": torch.tensor(math.log(50.0)),
    }
    for i in range(LAYERS):
        _block(sd, f"clip.visual.transformer.resblocks.{i}.", WIDTH, g)
        _block(sd, f"clip.transformer.resblocks.{i}.", WIDTH, g)
    if temporal:
        sd["frame_position_embeddings.weight"] = 0.1 * torch.randn(POSITIONS, EMBED, generator=g)
        for i in range(TEMPORAL_LAYERS):
            _block(sd, f"transformerClip.resblocks.{i}.", EMBED, g)
    for name, n in (("global_mat_weight", EMBED), ("local_mat_weight", EMBED), ("word_logit_weight", W_WORDS),
                    ("word_mat_weight", W_WORDS), ("word_mat_weight2", W_WORDS), ("frame_logit_weight", T_FRAMES),
                    ("frame_mat_weight", T_FRAMES), ("frame_mat_weight2", T_FRAMES)):
        sd[name] = torch.eye(n) + 0.2 * torch.randn(n, n, generator=g)
    return sd


# ---------------------------------------------------------------------------- hand-written reference
def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_block(x, sd, p, eps, mask):
    """x [N, L, w]; mask additive [N, L, L]."""
    n, L, w = x.shape
    h = ln(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(w, dim=-1)
    dh = w // HEADS
    q, k, v = (z.reshape(n, L, HEADS, dh).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-1, -2) / math.sqrt(dh) + mask[:, None]).softmax(-1)
    o = (att @ v).transpose(1, 2).reshape(n, L, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = ln(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps) @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_image(sd, img):
    x = F.conv2d(img, sd["clip.visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["clip.visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
    x = ln(x + sd["clip.visual.positional_embedding"], sd["clip.visual.ln_pre.weight"], sd["clip.visual.ln_pre.bias"],
           1e-5)
    zero = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype)
    for i in range(LAYERS):
        x = ref_block(x, sd, f"clip.visual.transformer.resblocks.{i}.", 1e-5, zero)
    return ln(x[:, 0], sd["clip.visual.ln_post.weight"], sd["clip.visual.ln_post.bias"], 1e-5) @ sd["clip.visual.proj"]


def ref_text(sd, tokens):
    n, L = tokens.shape
    x = sd["clip.token_embedding.weight"][tokens] + sd["clip.positional_embedding"][:L]
    causal = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1).expand(n, L, L)
    for i in range(LAYERS):
        x = ref_block(x, sd, f"clip.transformer.resblocks.{i}.", 1e-5, causal)
    hidden = ln(x, sd["clip.ln_final.weight"], sd["clip.ln_final.bias"], 1e-5) @ sd["clip.text_projection"]
    return hidden[torch.arange(n), tokens.argmax(-1)], hidden


def ref_video(sd, frames, mask):
    b, t = mask.shape
    raw = ref_image(sd, frames.reshape(b * t, 3, IMAGE, IMAGE)).reshape(b, t, -1)
    x = raw + sd["frame_position_embeddings.weight"][:t]
    additive = ((1.0 - mask.to(raw.dtype)) * -1000000.0)[:, None, :].expand(b, t, t)
    for i in range(TEMPORAL_LAYERS):
        x = ref_block(x, sd, f"transformerClip.resblocks.{i}.", 1e-12, additive)
    x = F.normalize(x + raw, dim=-1)
    m = mask.to(raw.dtype)[..., None]
    video = F.normalize((x * m).sum(1) / m.sum(1), dim=-1)
    return F.normalize(raw, dim=-1), video


def attend(scores, weight):
    """X-CLIP's attention over a similarity vector: sum_k (softmax(s / 0.01) @ M)[k] * s[k]."""
    return ((scores / 0.01).softmax(0) @ weight * scores).sum()


def ref_similarity(sd, sent, words, video, frames):
    """Pair by pair, as the X-CLIP paper describes the four scores."""
    out = torch.empty(sent.shape[0], video.shape[0], dtype=sent.dtype)
    for i in range(sent.shape[0]):
        for j in range(video.shape[0]):
            vs = sent[i] @ sd["global_mat_weight"] @ video[j]
            vw = attend(words[i] @ video[j], sd["word_logit_weight"])
            sf = attend(frames[j] @ sent[i], sd["frame_logit_weight"])
            s = words[i] @ sd["local_mat_weight"] @ frames[j].T  # [W, T]
            word_level = torch.stack([attend(s[:, f], sd["word_mat_weight"]) for f in range(s.shape[1])])
            frame_level = torch.stack([attend(s[w], sd["frame_mat_weight"]) for w in range(s.shape[0])])
            fw = (attend(word_level, sd["frame_mat_weight2"]) + attend(frame_level, sd["word_mat_weight2"])) / 2
            out[i, j] = sd["clip.logit_scale"].exp() * (vs + vw + sf + fw) / 4
    return out


def batch(seed=1, b=3):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, T_FRAMES, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)[:b]
    frames[~mask] = 0  # padded frames as a loader pads them
    tokens = torch.zeros(b, W_WORDS, dtype=torch.long)
    for i, n in enumerate([6, 4, 3][:b]):  # SOT .. EOT (the highest id) then zero padding
        tokens[i, :n] = torch.randint(1, VOCAB - 1, (n,), generator=g)
        tokens[i, 0], tokens[i, n - 1] = VOCAB - 2, VOCAB - 1
    return frames, mask, tokens


@pytest.fixture(scope="module")
def xclip():
    sd = {k: v.double() for k, v in tiny_xclip_state().items()}
    return XClipTeacher.from_state_dict(sd).double(), sd


def test_similarity_matches_hand_reference(xclip):
    teacher, sd = xclip
    frames, mask, tokens = batch()
    feats = teacher.encode(frames, mask, tokens)
    ref_frames, ref_vid = ref_video(sd, frames, mask)
    ref_sent, ref_hidden = ref_text(sd, tokens)
    torch.testing.assert_close(feats.video.frames, ref_frames, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(feats.video.video, ref_vid, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(feats.text.sentence, F.normalize(ref_sent, dim=-1), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(feats.text.words, F.normalize(ref_hidden, dim=-1), rtol=1e-9, atol=1e-10)
    got = teacher.similarity(feats.video, feats.text)
    want = ref_similarity(sd, F.normalize(ref_sent, dim=-1), F.normalize(ref_hidden, dim=-1), ref_vid, ref_frames)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # rectangular: 2 captions against 3 videos
    sub = type(feats.text)(feats.text.sentence[:2], feats.text.words[:2])
    torch.testing.assert_close(teacher.similarity(feats.video, sub), want[:2], rtol=1e-9, atol=1e-9)
    # fine target: softmax over each matched video's valid frames of cos(sentence, raw frame)
    rel = teacher.relevance(feats.video, feats.text)
    for i in range(3):
        valid = mask[i]
        torch.testing.assert_close(rel[i, valid], (ref_frames[i, valid] @ F.normalize(ref_sent[i], dim=-1)).softmax(0))
        assert (rel[i, ~valid] == 0).all()


def test_frozen_eval_no_grad(xclip):
    teacher, _ = xclip
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    frames, mask, tokens = batch(b=2)
    feats = teacher.encode(frames, mask, tokens)
    assert not feats.video.video.requires_grad and not teacher.similarity(feats.video, feats.text).requires_grad


def test_padded_frames_do_not_change_the_video_feature(xclip):
    teacher, _ = xclip
    frames, mask, tokens = batch()
    other = frames.clone()
    other[~mask] = 5.0  # the temporal transformer and the mean pooling must ignore padded frames
    a, b = teacher.encode_video(frames, mask), teacher.encode_video(other, mask)
    torch.testing.assert_close(a.video, b.video, rtol=1e-9, atol=1e-10)


def test_checkpoint_file_round_trip_and_ddp_prefix(tmp_path):
    sd = tiny_xclip_state(temporal=False)  # meanP: no temporal transformer
    path = tmp_path / "xclip.bin"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    teacher = XClipTeacher.from_checkpoint(path)
    assert not teacher.seq_transf and teacher.max_frames == T_FRAMES and teacher.max_words == W_WORDS
    assert teacher.meta()["weights"] == str(path)
    torch.testing.assert_close(teacher.word_mat_weight, sd["word_mat_weight"])


def test_unknown_missing_and_misshaped_keys_are_named():
    sd = tiny_xclip_state()
    bad = dict(sd, **{"cross.pooler.dense.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"1 unknown keys: cross\.pooler\.dense\.weight"):
        XClipTeacher.from_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k not in ("frame_mat_weight2", "clip.ln_final.bias")}
    with pytest.raises(ValueError, match=r"missing keys: clip\.ln_final\.bias, frame_mat_weight2"):
        XClipTeacher.from_state_dict(bad)
    bad = dict(sd, word_mat_weight=torch.eye(W_WORDS + 1))
    with pytest.raises(ValueError, match=r"wrong shapes: word_mat_weight \(7, 7\)"):
        XClipTeacher.from_state_dict(bad)
    bad = {k: v for k, v in sd.items() if k != "frame_position_embeddings.weight"}
    with pytest.raises(ValueError, match="missing key frame_position_embeddings.weight"):
        XClipTeacher.from_state_dict(bad)
    with pytest.raises(ValueError, match="no clip"):
        XClipTeacher.from_state_dict({"global_mat_weight": torch.eye(2)})


def test_wrong_frame_or_word_count_is_an_error(xclip):
    teacher, _ = xclip
    frames, mask, tokens = batch()
    with pytest.raises(ValueError, match="max_frames=4"):
        teacher.encode_video(frames[:, :3], mask[:, :3])
    with pytest.raises(ValueError, match="max_words=6"):
        teacher.encode_text(tokens[:, :5])
    with pytest.raises(ValueError, match="word features"):
        teacher.similarity(teacher.encode_video(frames, mask), type(teacher.encode_text(tokens))(torch.zeros(3, EMBED)))
