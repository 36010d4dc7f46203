"""Video teacher cache: shards per rank merged by id, manifest checks, and cache == live teacher
(exact with a float32 cache; the fp16 cache equals the live teacher on fp16-rounded features)."""
import json

import pytest
import torch
import torch.nn.functional as F

from open_clip_train.video.distill_loss import VideoDistillLoss
from open_clip_train.video.teacher import OpenClipFrameTeacher, TextFeatures, VideoFeatures
from open_clip_train.video.teacher_cache import (
    CachedVideoTeacher,
    VideoShardWriter,
    VideoTeacherCache,
    live_targets,
    manifest_meta,
    write_manifest,
)
from open_clip_train.video.xclip import XClipTeacher
from test_video_distill_xclip import IMAGE, T_FRAMES, VOCAB, W_WORDS, tiny_xclip_state

N = 5
VIDEO_IDS = [f"video{i}" for i in range(N)]
SEN_IDS = [100 + i for i in range(N)]  # caption i describes video i
SHARDS = {0: [0, 2, 4], 1: [1, 3]}  # videos per rank; captions split the other way below
CAPTION_SHARDS = {0: [1, 3], 1: [0, 2, 4]}


def data(seed=0, frames_per_video=T_FRAMES, image=IMAGE):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(N, frames_per_video, 3, image, image, generator=g)
    valid = [frames_per_video, frames_per_video - 1, 2, 1, frames_per_video]
    mask = torch.arange(frames_per_video)[None] < torch.tensor(valid)[:, None]
    frames[~mask] = 0
    tokens = torch.zeros(N, W_WORDS, dtype=torch.long)
    for i in range(N):
        n = 2 + i % (W_WORDS - 1)
        tokens[i, :n] = torch.randint(1, VOCAB - 2, (n,), generator=g)
        tokens[i, n - 1] = VOCAB - 1
    return frames, mask, tokens


def extract(teacher, out, frames, mask, tokens, dtype="float16", words=True, data_root="/data/msrvtt"):
    """Two simulated ranks, each writing its own shard; then the manifest."""
    for rank in (0, 1):
        v, c = SHARDS[rank], CAPTION_SHARDS[rank]
        w = VideoShardWriter(out, rank, n_videos=len(v), n_captions=len(c), max_frames=frames.shape[1],
                             dim=teacher.encode_video(frames[:1], mask[:1]).video.shape[1],
                             words=W_WORDS if words else None, dtype=dtype)
        w.add_videos([VIDEO_IDS[i] for i in v], teacher.encode_video(frames[v], mask[v]))
        w.add_captions([SEN_IDS[i] for i in c], teacher.encode_text(tokens[c]))
        w.finish()
    meta = manifest_meta(teacher, frame_sampling={"fps": 1, "slice": "uniform"}, max_frames=frames.shape[1],
                         max_words=tokens.shape[1], image_size=frames.shape[-1], data_root=data_root)
    return write_manifest(out, meta, 2, teacher.head_state()), meta


@pytest.fixture(scope="module")
def xclip(tmp_path_factory):
    root = tmp_path_factory.mktemp("xclip")
    weights = root / "xclip.bin"
    torch.save(tiny_xclip_state(), weights)
    return XClipTeacher.from_checkpoint(weights), root


def student(seed=3, b=4, t=T_FRAMES):
    g = torch.Generator().manual_seed(seed)
    return 10 * torch.randn(b, b, generator=g), torch.randn(b, t, generator=g)


BATCH = [3, 0, 4, 1]  # a shuffled batch across both shards


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_loss_equals_live_loss(xclip, tmp_path, dtype):
    teacher, _ = xclip
    frames, mask, tokens = data()
    manifest, _ = extract(teacher, tmp_path / "c", frames, mask, tokens, dtype=dtype)
    assert manifest["counts"] == {"videos": N, "captions": N}
    assert manifest["features"]["dtype"] == dtype and manifest["features"]["words"] == W_WORDS
    cached = CachedVideoTeacher(VideoTeacherCache(tmp_path / "c"))
    logits_s, scores = student()
    bmask = mask[BATCH]
    loss = VideoDistillLoss()
    got_logits, got_rel = cached.targets([VIDEO_IDS[i] for i in BATCH], [SEN_IDS[i] for i in BATCH])
    got = loss(logits_s, scores, bmask, [got_logits], [got_rel])

    live = teacher.encode(frames[BATCH], bmask, tokens[BATCH])
    if dtype == "float16":  # what the cache stored: the live features rounded to fp16
        r = lambda x: x.half().float()  # noqa: E731
        live.video = VideoFeatures(r(live.video.frames), r(live.video.video), live.video.mask)
        live.text = TextFeatures(r(live.text.sentence), r(live.text.words))
    want = loss(logits_s, scores, bmask, [teacher.similarity(live.video, live.text)],
                [teacher.relevance(live.video, live.text)])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    # and against the unrounded live teacher: within fp16 rounding of the features
    exact = loss(logits_s, scores, bmask, *[[x] for x in live_targets(teacher, frames[BATCH], bmask, tokens[BATCH])])
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], rtol=2e-2, atol=1e-3)
    assert got["distill_coarse_loss"] > 0 and got["distill_fine_loss"] > 0


def test_manifest_records_provenance_and_mismatch_is_one_line_error(xclip, tmp_path):
    teacher, root = xclip
    frames, mask, tokens = data()
    manifest, meta = extract(teacher, tmp_path / "c", frames, mask, tokens)
    assert manifest["teacher"]["kind"] == "xclip" and len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["frames"] == {"sampling": {"fps": 1, "slice": "uniform"}, "max_frames": T_FRAMES,
                                  "image_size": [IMAGE, IMAGE]}
    assert manifest["text"]["max_words"] == W_WORDS and manifest["data"]["root"] == "/data/msrvtt"
    cache = VideoTeacherCache(tmp_path / "c")
    cache.check(meta)  # the same settings pass
    for field, value in (("frames.max_frames", 12), ("data.root", "/elsewhere"), ("text.max_words", 32),
                         ("frames.sampling.fps", 3)):
        with pytest.raises(ValueError, match=rf"^video teacher cache .*: {field} is .* in the cache but") as e:
            cache.check({field: value})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"2 of 3 videos \(ids video7, video9\).*1 of 2 captions \(ids 999\)"):
        cache.check_covers(["video0", "video7", "video9"], [100, 999])
    with pytest.raises(ValueError, match=r"1 of 1 videos \(ids video8\) of this batch"):
        cache.videos(["video8"])


def test_unfinished_or_word_less_cache(xclip, tmp_path):
    teacher, _ = xclip
    frames, mask, tokens = data()
    with pytest.raises(ValueError, match="no manifest.json"):
        VideoTeacherCache(tmp_path)
    extract(teacher, tmp_path / "nowords", frames, mask, tokens, words=False)
    cache = VideoTeacherCache(tmp_path / "nowords")
    assert cache.captions([100]).words is None
    with pytest.raises(ValueError, match="needs word features"):
        CachedVideoTeacher(cache)
    (tmp_path / "nowords" / "shard_1.video.npy").unlink()
    with pytest.raises(ValueError, match="missing shard file shard_1.video.npy"):
        VideoTeacherCache(tmp_path / "nowords")


@pytest.fixture(scope="module")
def frame_teacher():
    from open_clip_train.models import create_model
    torch.manual_seed(0)
    model, _ = create_model("tiny-convnext-cliptext")
    return OpenClipFrameTeacher(model, name="tiny-convnext-cliptext", frame_batch=4)


def test_open_clip_frame_teacher_by_hand_and_cached(frame_teacher, tmp_path):
    teacher = frame_teacher
    frames, mask, _ = data(frames_per_video=3, image=64)
    tokens = torch.randint(1, 400, (N, 32))
    feats = teacher.encode(frames, mask, tokens)
    model = teacher.model
    for i in range(N):
        per_frame = F.normalize(model.encode_image(frames[i]), dim=-1)
        torch.testing.assert_close(feats.video.frames[i], per_frame, rtol=1e-5, atol=1e-6)
        mean = per_frame[mask[i]].mean(0)
        torch.testing.assert_close(feats.video.video[i], mean / mean.norm(), rtol=1e-5, atol=1e-6)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    want = model.logit_scale.exp() * text @ feats.video.video.T
    torch.testing.assert_close(teacher.similarity(feats.video, feats.text), want, rtol=1e-5, atol=1e-5)
    assert not teacher.similarity(feats.video, feats.text).requires_grad and not teacher.training
    # the cache of a per-frame teacher needs no word features and gives the same targets
    out = tmp_path / "oc"
    for rank in (0, 1):
        v, c = SHARDS[rank], CAPTION_SHARDS[rank]
        w = VideoShardWriter(out, rank, n_videos=len(v), n_captions=len(c), max_frames=3, dim=64, dtype="float32")
        w.add_videos([VIDEO_IDS[i] for i in v], teacher.encode_video(frames[v], mask[v]))
        w.add_captions([SEN_IDS[i] for i in c], teacher.encode_text(tokens[c]))
        w.finish()
    write_manifest(out, manifest_meta(teacher, frame_sampling={"fps": 1}, max_frames=3, max_words=32, image_size=64,
                                      data_root=tmp_path), 2, teacher.head_state())
    got = CachedVideoTeacher(VideoTeacherCache(out)).targets([VIDEO_IDS[i] for i in BATCH],
                                                              [SEN_IDS[i] for i in BATCH])
    want = live_targets(teacher, frames[BATCH], mask[BATCH], tokens[BATCH])
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-6, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["features"]["words"] is None
