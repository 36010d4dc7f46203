"""`extract_teacher --dataset-type msrvtt`: the cache it writes gives the live teacher's targets."""
import json

import pytest
import torch

from open_clip_train.extract_teacher import main as extract
from open_clip_train.models import create_model
from open_clip_train.video.dataset import VideoDataset
from open_clip_train.video.demo import write_demo
from open_clip_train.video.distill_run import build_teacher, open_caches
from open_clip_train.video.model import VideoModelCfg
from open_clip_train.video.msrvtt import train_split
from open_clip_train.video.teacher_cache import CachedVideoTeacher, VideoTeacherCache, live_targets
from open_clip_train.video.training import VideoCfg, frame_source

TEACHER = "tiny-convnext-cliptext"
FRAMES, WORDS = 2, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vextract")
    write_demo(tmp / "data", num_train=12, num_test=4, seed=0)
    torch.manual_seed(1)
    model, _ = create_model(TEACHER)
    torch.save(model.state_dict(), tmp / "teacher.pt")
    return tmp


def run(setup, out, *extra):
    return extract(["--dataset-type", "msrvtt", "--train-data", str(setup / "data"), "--max-frames", str(FRAMES),
                    "--max-words", str(WORDS), "--teacher-model", TEACHER, "--teacher-pretrained",
                    str(setup / "teacher.pt"), "--out", str(out), "--workers", "0", "--batch-size", "5", *extra])


def test_cache_targets_equal_live_targets(setup):
    assert run(setup, setup / "c32", "--dtype", "float32") == 0
    manifest = json.loads((setup / "c32" / "manifest.json").read_text())
    assert manifest["data"]["root"] == str((setup / "data").resolve())
    assert manifest["frames"]["max_frames"] == FRAMES and manifest["text"]["max_words"] == WORDS
    assert manifest["features"]["dtype"] == "float32" and len(manifest["teacher"]["weights_sha256"]) == 64
    split = train_split(setup / "data", "9k")
    assert manifest["counts"] == {"videos": len(split.video_ids), "captions": split.num_captions}

    inputs = build_teacher(TEACHER, str(setup / "teacher.pt"), max_words=WORDS)
    video = VideoCfg(max_words=WORDS, model=VideoModelCfg(max_frames=FRAMES))
    data = VideoDataset(split.video_ids, frame_source(video, str(setup / "data")), inputs.transform(), FRAMES)
    pairs = split.pair_ids()
    caps = split.flat_captions()
    rows = [0, 7, 13, 22, 41, 59]  # captions of different videos
    video_rows = split.text_to_video()[rows].tolist()
    assert len(set(video_rows)) == len(rows)
    frames = torch.stack([data[v][0] for v in video_rows])
    mask = torch.stack([data[v][1] for v in video_rows])
    tokens = inputs.tokenizer([caps[r] for r in rows])
    want_logits, want_rel = live_targets(inputs.teacher, frames, mask, tokens)

    cached = CachedVideoTeacher(VideoTeacherCache(setup / "c32"))
    logits, rel = cached.targets([split.video_ids[v] for v in video_rows], pairs[rows, 1].tolist())
    torch.testing.assert_close(logits, want_logits, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rel, want_rel, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits, logits.diagonal().mean().expand_as(logits))  # targets carry information

    # the trainer's checks accept it for the same settings and name what differs otherwise
    open_caches(str(setup / "c32"), video, str(setup / "data"), [TEACHER])
    with pytest.raises(ValueError, match="frames.max_frames is 2 in the cache but 3 for this run"):
        open_caches(str(setup / "c32"), VideoCfg(max_words=WORDS, model=VideoModelCfg(max_frames=3)),
                    str(setup / "data"), [TEACHER])


def test_user_errors_are_one_line(setup, capsys):
    assert run(setup, setup / "bad", "--msrvtt-train-split", str(setup / "nope.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --msrvtt-train-split") and "not found" in err[0]
    assert run(setup, setup / "c16") == 0
    assert run(setup, setup / "c16") == 2
    assert "already holds a teacher cache" in capsys.readouterr().err


def test_xclip_cache_targets_equal_live_targets(setup, monkeypatch):
    import test_video_distill_xclip as tiny

    monkeypatch.setattr(tiny, "VOCAB", 49408)  # real CLIP BPE ids
    torch.save(tiny.tiny_xclip_state(), setup / "xclip.bin")
    frames_n, words_n = tiny.T_FRAMES, tiny.W_WORDS
    assert extract(["--dataset-type", "msrvtt", "--train-data", str(setup / "data"), "--max-frames", str(frames_n),
                    "--max-words", str(words_n), "--teacher-model", "xclip", "--teacher-pretrained",
                    str(setup / "xclip.bin"), "--out", str(setup / "cx"), "--dtype", "float32", "--workers", "0"]) == 0
    manifest = json.loads((setup / "cx" / "manifest.json").read_text())
    assert manifest["teacher"]["kind"] == "xclip" and manifest["features"]["words"] == words_n
    assert manifest["frames"]["image_size"] == [tiny.IMAGE, tiny.IMAGE]

    inputs = build_teacher("xclip", str(setup / "xclip.bin"), max_words=words_n)
    split = train_split(setup / "data", "9k")
    video = VideoCfg(max_words=words_n, model=VideoModelCfg(max_frames=frames_n))
    data = VideoDataset(split.video_ids, frame_source(video, str(setup / "data")), inputs.transform(), frames_n)
    rows = [3, 9, 30, 57]
    video_rows = split.text_to_video()[rows].tolist()
    frames = torch.stack([data[v][0] for v in video_rows])
    mask = torch.stack([data[v][1] for v in video_rows])
    tokens = inputs.tokenizer([split.flat_captions()[r] for r in rows])
    assert tokens.shape == (len(rows), words_n) and int(tokens.max()) > 40  # BPE ids, end token kept
    want_logits, want_rel = live_targets(inputs.teacher, frames, mask, tokens)
    logits, rel = CachedVideoTeacher(VideoTeacherCache(setup / "cx")).targets(
        [split.video_ids[v] for v in video_rows], split.pair_ids()[rows, 1].tolist())
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rel, want_rel, rtol=1e-5, atol=1e-6)
