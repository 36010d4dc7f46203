"""Frame sampling, PyAV decoding, padding, the frame store and the demo clips."""
import filecmp
import json

import numpy as np
import pytest
import torch

from open_clip_train import demo_video_data, extract_frames
from open_clip_train.data.bad_samples import EMPTY_FILE, MISSING
from open_clip_train.video.demo import write_video
from open_clip_train.video.frame_store import LiveFrames, StoredFrames, extract, read_spec
from open_clip_train.video.frames import NO_FRAMES, UNDECODABLE_VIDEO, BadVideo, FrameSpec, decode_frames, \
    pad_frames, sample_indices

BITS, W = 8, 64


def index_clip(n: int) -> np.ndarray:
    """Frame i shows i in binary as BITS black/white vertical stripes (robust to H.264)."""
    frames = np.zeros((n, 32, W, 3), dtype=np.uint8)
    stripe = W // BITS
    for i in range(n):
        for b in range(BITS):
            if (i >> b) & 1:
                frames[i, :, b * stripe:(b + 1) * stripe] = 255
    return frames


def read_index(frame: np.ndarray) -> int:
    stripe = W // BITS
    means = [frame[:, b * stripe + 2:(b + 1) * stripe - 2].mean() for b in range(BITS)]
    return sum(1 << b for b, m in enumerate(means) if m > 127)


def test_sample_indices_one_per_second_then_linspace():
    assert sample_indices(75, 15, FrameSpec(max_frames=12)) == [0, 15, 30, 45, 60]
    # 30 s at 10 fps: seconds 0..29 -> 12 evenly spaced of them (np.linspace(0, 29, 12) truncated)
    want = [10 * int(s) for s in np.linspace(0, 29, 12)]
    assert sample_indices(300, 10, FrameSpec(max_frames=12)) == want == [0, 20, 50, 70, 100, 130, 150, 180,
                                                                          210, 230, 260, 290]
    assert sample_indices(100, 29.97, FrameSpec(max_frames=12)) == [0, 29, 59, 89]  # floor(s * 29.97)
    assert sample_indices(3, 0.5, FrameSpec()) == [0, 1, 2]  # below 1 fps: every frame, once
    assert sample_indices(0, 30, FrameSpec()) == []


@pytest.mark.parametrize("n, fps, max_frames, codec", [(60, 10, 12, "mpeg4"), (150, 10, 4, "mpeg4"),
                                                      (23, 5, 12, "mpeg4"), (150, 30, 12, "libx264")])
def test_decoded_frames_are_the_sampled_indices(tmp_path, n, fps, max_frames, codec):
    path = tmp_path / "clip.mp4"
    write_video(path, index_clip(n), fps=fps, quality=1, codec=codec)
    spec = FrameSpec(max_frames=max_frames)
    frames = decode_frames(path, spec)
    assert [read_index(f) for f in frames] == sample_indices(n, fps, spec)


def test_short_clip_is_padded_with_a_mask(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, index_clip(25), fps=10, quality=1)  # 2.5 s -> frames 0, 10, 20
    frames = torch.from_numpy(decode_frames(path, FrameSpec())).permute(0, 3, 1, 2)
    padded, mask = pad_frames(frames, 12)
    assert padded.shape == (12, 3, 32, W)
    assert mask.tolist() == [True] * 3 + [False] * 9
    assert torch.equal(padded[:3], frames) and not padded[3:].any()
    # every mask the data makes has a real frame (pooling relies on it without reading the mask)
    for n in (0, 13):
        with pytest.raises(ValueError, match="needs 1 to max_frames"):
            pad_frames(frames.new_zeros((n, *frames.shape[1:])), 12)


def test_short_side_resize(tmp_path):
    path = tmp_path / "c.mp4"
    write_video(path, index_clip(10), fps=10)
    assert decode_frames(path, FrameSpec(short_side=16)).shape == (1, 16, 32, 3)
    assert decode_frames(path, FrameSpec(short_side=64)).shape == (1, 32, W, 3)  # never upsampled


def test_bad_videos_raise_with_their_reason(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 50)
    cases = {"missing.mp4": MISSING, "empty.mp4": EMPTY_FILE, "junk.mp4": UNDECODABLE_VIDEO}
    for name, reason in cases.items():
        with pytest.raises(BadVideo) as e:
            decode_frames(tmp_path / name, FrameSpec())
        assert e.value.reason == reason, name


def test_no_frames(tmp_path):
    import av

    path = tmp_path / "audio_only.mp4"  # a valid mp4 without a video stream
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    assert path.stat().st_size > 0
    with pytest.raises(BadVideo) as e:
        decode_frames(path, FrameSpec())
    assert e.value.reason == NO_FRAMES


def test_frame_store_round_trip_equals_live_decoding(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for k, n in enumerate((15, 47, 130)):
        write_video(videos / f"video{k}.mp4", index_clip(n) + k, fps=10)
    (videos / "video3.mp4").write_bytes(b"broken")
    spec = FrameSpec(max_frames=5, short_side=24)
    ids = [f"video{k}" for k in range(5)]  # video4 has no file
    reports = [extract(ids, videos, tmp_path / "store", spec, rank=r, world_size=2) for r in (0, 1)]
    assert sum(r.written for r in reports) == 3
    assert {k: v for r in reports for k, v in r.bad.items()} == {"video3": UNDECODABLE_VIDEO, "video4": MISSING}
    assert read_spec(tmp_path / "store") == spec
    live, stored = LiveFrames(videos, spec), StoredFrames(tmp_path / "store")
    for vid in ids[:3]:
        a, b = live.load(vid), stored.load(vid)
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    for vid, reason in (("video3", UNDECODABLE_VIDEO), ("video4", MISSING), ("video9", MISSING)):
        with pytest.raises(BadVideo) as e:
            stored.load(vid)
        assert e.value.reason == reason
    again = extract(ids, videos, tmp_path / "store", spec)  # resumes: nothing decoded twice
    assert again.written == 0 and again.skipped == 5
    with pytest.raises(ValueError, match="max_frames 5"):
        StoredFrames(tmp_path / "store", expect=FrameSpec(max_frames=12))


def test_demo_is_deterministic_and_extractable(tmp_path, capsys):
    for name in ("a", "b"):
        assert demo_video_data.main([str(tmp_path / name), "--num-train", "9", "--num-test", "3", "--seed", "4"]) == 0
    demo_video_data.main([str(tmp_path / "c"), "--num-train", "9", "--num-test", "3", "--seed", "5"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 + 12
    for f in files:
        assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    assert (tmp_path / "a/MSRVTT_data.json").read_text() != (tmp_path / "c/MSRVTT_data.json").read_text()
    data = json.loads((tmp_path / "a/MSRVTT_data.json").read_text())
    assert [v["split"] for v in data["videos"]].count("test") == 3
    assert extract_frames.main([str(tmp_path / "a"), "--out", str(tmp_path / "store")]) == 0
    assert len(list((tmp_path / "store").glob("video*.npy"))) == 12
    frames = StoredFrames(tmp_path / "store").load("video0")
    assert 2 <= frames.shape[0] <= 4 and frames.shape[1:] == (64, 64, 3)  # 2-4 s at one frame per second


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        extract_frames.main([str(tmp_path), "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "video folder" in err[0] and "error:" in err[0]
    (tmp_path / "videos").mkdir()
    assert extract_frames.main([str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "MSRVTT_data.json" in err[0]
