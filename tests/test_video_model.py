"""Pooling on hand-computed inputs, padded frames ignored, and the video wrapper on a tiny model."""
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss

from open_clip_train.data.bad_samples import MISSING, BadTally
from open_clip_train.distributed import World
from open_clip_train.models import create_model
from open_clip_train.video.dataset import build_eval, frame_transform
from open_clip_train.video.evaluation import evaluate_video_retrieval
from open_clip_train.video.frames import BadVideo
from open_clip_train.video.metrics import video_retrieval_metrics
from open_clip_train.video.msrvtt import VideoCaptions
from open_clip_train.video.model import VIDEO_PREFIX, VideoModelCfg, attach_video, video_param_names
from open_clip_train.video.pooling import POOLINGS, VideoPool

TINY = "tiny-convnext-cliptext"


def _identity_blocks(pool):
    """Zero each block's output projections: a residual block then returns its input."""
    with torch.no_grad():
        for b in pool.temporal.blocks:
            for p in (b.attn.out_proj.weight, b.attn.out_proj.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias):
                p.zero_()


def test_mean_pooling_by_hand():
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, -100.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    out = VideoPool("mean", 2, 3).double()(x, mask)
    mean = torch.tensor([0.8, 0.4], dtype=torch.float64)  # mean of [0.6, 0.8] and [1, 0]
    torch.testing.assert_close(out.features[0], mean / mean.norm())
    assert out.weights.tolist() == [[0.5, 0.5, 0.0]]


def test_afa_by_hand_with_temperature_and_mask():
    pool = VideoPool("afa", 2, 3).double()
    with torch.no_grad():
        pool.afa.fc1.weight.copy_(torch.eye(2))
        pool.afa.fc1.bias.zero_()
        pool.afa.fc2.weight.copy_(torch.tensor([[1.0, 0.0]]))
        pool.afa.fc2.bias.zero_()
    x = torch.tensor([[[0.2, 0.0], [0.0, 3.0], [50.0, 0.0]]], dtype=torch.float64)  # scores 0.2, 0, (50)
    out = pool(x, torch.tensor([[True, True, False]]))
    w0 = math.exp(0.2 / 0.1) / (math.exp(0.2 / 0.1) + 1)
    assert out.scores[0, :2].tolist() == pytest.approx([0.2, 0.0])
    assert out.weights[0].tolist() == pytest.approx([w0, 1 - w0, 0.0])
    v = torch.tensor([w0, 1 - w0], dtype=torch.float64)  # normalised frames are [1, 0] and [0, 1]
    torch.testing.assert_close(out.features[0], v / v.norm())


def test_seqtransf_identity_blocks_by_hand():
    pool = VideoPool("seqtransf", 2, 3, temporal_layers=2).double()
    _identity_blocks(pool)
    with torch.no_grad():
        pool.temporal.position_embeddings.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]))
    x = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [-9.0, 4.0]]], dtype=torch.float64)
    out = pool(x, torch.tensor([[True, True, False]]))
    frames = 2 * x[0, :2] + pool.temporal.position_embeddings[:2]  # (x + pos) + x: [3, 2], [4, 1]
    expect = (frames / frames.norm(dim=-1, keepdim=True)).mean(0)
    torch.testing.assert_close(out.features[0], expect / expect.norm())


@pytest.mark.parametrize("kind", POOLINGS)
def test_padded_frames_are_ignored(kind):
    torch.manual_seed(0)
    pool = VideoPool(kind, 8, 5, temporal_layers=2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    y = x.clone()
    y[~mask] = torch.randn(int((~mask).sum()), 8, dtype=torch.float64) * 100
    a, b = pool(x, mask), pool(y, mask)
    torch.testing.assert_close(a.features, b.features)
    assert (a.weights[~mask] == 0).all()
    torch.testing.assert_close(a.weights.sum(1), torch.ones(3, dtype=torch.float64))
    short = pool(x[:1, :3], mask[:1, :3])  # the same video without the padding
    torch.testing.assert_close(a.features[:1], short.features)


def _tiny(pooling="mean", **kw):
    torch.manual_seed(0)
    model = create_model(TINY)[0]
    return attach_video(model, VideoModelCfg(pooling=pooling, max_frames=4, **kw))


def _batch(b=2, t=4):
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(b, t, 3, 64, 64, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 2:] = False
    text = torch.randint(1, 400, (b, 32), generator=g)
    return frames, mask, text


def test_wrapper_keeps_names_and_adds_video_pool():
    plain = create_model(TINY)[0]
    model = _tiny("seqtransf-afa", temporal_layers=2)
    names = [n for n, _ in model.named_parameters()]
    new = [n for n in names if n not in dict(plain.named_parameters())]
    assert new == video_param_names(model) and new and all(n.startswith(VIDEO_PREFIX) for n in new)
    # seqtransf starts from the text tower: copies of its first blocks and its first positions
    for i, block in enumerate(model.video_pool.temporal.blocks):
        text_block = model.transformer.resblocks[i].state_dict()
        assert block is not model.transformer.resblocks[i]
        for n, p in block.state_dict().items():
            assert torch.equal(p, text_block[n]), n
    torch.testing.assert_close(model.video_pool.temporal.position_embeddings, model.positional_embedding[:4])
    # an image-text checkpoint loads with only the video modules missing
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {n for n in model.state_dict() if n.startswith(VIDEO_PREFIX)}


def test_forward_gives_open_clip_output_and_frames_match_images():
    model = _tiny("afa").eval()
    frames, mask, text = _batch()
    out = model(frames, text, frame_mask=mask)
    assert out["image_features"].shape == (2, 64) and out["frame_scores"].shape == (2, 4)
    assert (out["frame_weights"][0, 2:] == 0).all()
    # per-frame features are encode_image of each frame
    with torch.no_grad():
        torch.testing.assert_close(model.encode_frames(frames)[1, 3], model.encode_image(frames[1, 3:4])[0])
    torch.testing.assert_close(out["image_features"], model.encode_video(frames, mask))
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    assert torch.isfinite(loss)
    images = frames[:, 0]
    assert model(images, text)["image_features"].shape == (2, 64)  # 4-D input: the image model


def _grad_enabled_in_tower(model):
    seen = []
    model.visual.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    return seen


@pytest.mark.parametrize("pooling", ["mean", "seqtransf-afa"])
def test_locked_image_tower_runs_without_autograd(pooling):
    model = _tiny(pooling, temporal_layers=2).train()
    for n, p in model.named_parameters():  # --lock-image --lock-text
        if not n.startswith(VIDEO_PREFIX) and n != "logit_scale":
            p.requires_grad_(False)
    seen = _grad_enabled_in_tower(model)
    frames, mask, text = _batch()
    feats = model.encode_frames(frames)
    assert feats.grad_fn is None and not feats.requires_grad
    out = model(frames, text, frame_mask=mask)
    assert seen == [False, False]
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(video_param_names(model)) | {"logit_scale"}
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    if pooling == "mean":
        assert not video_param_names(model)
    else:
        # every video parameter learns, except AFA's last bias: softmax ignores a shift of all scores
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in video_param_names(model)
                   if n != "video_pool.afa.fc2.bias")


def test_video_modules_trainable_even_when_attached_to_a_locked_model():
    torch.manual_seed(0)
    model = create_model(TINY)[0]
    model.requires_grad_(False)
    attach_video(model, VideoModelCfg(pooling="seqtransf-afa", max_frames=4, temporal_layers=2))
    assert all(model.get_parameter(n).requires_grad for n in video_param_names(model))


def test_unlocked_tower_trains_and_grad_checkpointing_gives_the_same_grads():
    grads = []
    for checkpointing in (False, True):
        model = _tiny("seqtransf", temporal_layers=2).double().train()
        model.set_grad_checkpointing(checkpointing)
        seen = _grad_enabled_in_tower(model)
        frames, mask, text = _batch()
        out = model(frames.double(), text, frame_mask=mask)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        assert seen == [True]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("visual.")})
        assert any(g.abs().sum() > 0 for g in grads[-1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_evaluation_leaves_bad_videos_out_and_matches_direct_metrics():
    class Frames:
        def load(self, vid):
            if vid == "video1":
                raise BadVideo(MISSING, vid)
            k = int(vid[5:])
            return np.random.default_rng(k).integers(0, 256, (k % 3 + 1, 64, 64, 3), dtype=np.uint8)

        def name(self, vid):
            return vid

    model = _tiny("mean").eval()
    vids = [f"video{k}" for k in range(5)]
    split = VideoCaptions(vids, [[f"caption {k} {j}" for j in range(k % 2 + 1)] for k in range(5)],
                          [list(range(k % 2 + 1)) for k in range(5)])
    data = build_eval(split, Frames(), frame_transform(model), open_clip.get_tokenizer("RN50", context_length=32), 4)
    bad = BadTally()
    got = evaluate_video_retrieval(model, data, World(), torch.device("cpu"), "fp32", 2, 0, chunk_size=2, bad=bad)
    assert bad.total == 1 and got["num_bad_videos"] == 1 and got["msrvtt_num_videos"] == 4
    good = [0, 2, 3, 4]
    with torch.no_grad():
        items = [data.videos[i] for i in good]
        vf = model.encode_video(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]))
        keep = torch.isin(data.text_to_video, torch.tensor(good))
        tf = torch.nn.functional.normalize(model.encode_text(data.texts[keep]), dim=-1)
    t2v = torch.searchsorted(torch.tensor(good), data.text_to_video[keep])
    assert got == pytest.approx(video_retrieval_metrics(vf, tf, t2v, num_bad_videos=1))
    assert got["msrvtt_num_captions"] == int(keep.sum()) == 5
