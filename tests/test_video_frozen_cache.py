"""--frozen-feature-cache on MSR-VTT video runs: the cached run (frozen image part per frame, frozen
text tower per caption) trains to the live run's weights, with both towers locked and with only the
image tower locked; a second run reuses the cache without computing or decoding anything; a manifest
mismatch is one error line; an unlock switches back to live; a cached video teacher combines with it.
Every run has a broken training video, so the bad-video substitution is compared too."""
import json
import re
import shutil

import pytest
import torch

from open_clip_train import frozen_features
from open_clip_train.main import main
from open_clip_train.video import frame_store
from open_clip_train.video.demo import write_demo

MODEL = "tiny-convnext-cliptext"
# Plain SGD: cached and live frozen outputs can differ by float32 rounding (other batch
# compositions), and SGD keeps the weight differences rounding-sized, where Adam would amplify them.
SGD = ("--opt", "sgd", "--momentum", "0", "--lr", "0.5")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vffc")
    write_demo(root / "data", num_train=12, num_test=4, seed=0)
    (root / "data" / "videos" / "video3.mp4").write_bytes(b"")  # a bad training video, substituted
    return root


def _argv(root, name, *extra):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "msrvtt", "--train-data", root / "data", "--video-pooling", "afa",
        "--max-frames", 3, "--epochs", 1, "--batch-size", 12, *SGD, "--warmup", 1, "--workers", 0,
        "--precision", "fp32", "--device", "cpu", "--seed", 0, "--log-every-n-steps", 1,
        "--max-bad-samples-fraction", 0.5, "--log-dir", root / "logs", "--name", name, *extra)]


def _run(root, name, *extra) -> str:
    assert main(_argv(root, name, *extra)) == 0
    return (root / "logs" / name / "out.log").read_text()


def _weights(root, name, epoch=1):
    return torch.load(root / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu",
                      weights_only=True)["state_dict"]


def _same_weights(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _moved(a, b, key):
    return (a[key] - b[key]).abs().max() > 1e-4


def _bad_lines(log):
    return re.findall(r"data, epoch \d+: .*", log)


def _one_error_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


@pytest.mark.slow
def test_cached_equals_live_and_is_reused(data, monkeypatch):
    root, cache = data, data / "cache_both"
    live = _run(root, "live", "--lock-image", "--lock-text")
    assert "--frozen-feature-cache DIR would compute" in live
    first = _run(root, "cached", "--lock-image", "--lock-text", "--frozen-feature-cache", cache)
    assert re.search(r"frozen-feature cache .*: computed the image tower's visual\.trunk and the text tower", first)
    m = json.loads((cache / "manifest.json").read_text())
    assert m["parts"] == {"image": "visual.trunk", "text": "text"}
    assert m["frames"]["max_frames"] == 3 and m["text"]["max_words"] == 32 and m["data"]["split"] == "9k"
    assert m["data"]["frames_source"] == str((root / "data" / "videos").resolve())
    assert [n for n, _ in m["bad_videos"]] == [3] and m["tables"]["frames"]["rows"] == 11
    assert m["tables"]["text"]["rows"] == 60 and m["tables"]["frames"]["row_shape"][0] == 3
    assert _bad_lines(first) == _bad_lines(live) and "empty file" in _bad_lines(live)[0]
    wl, wc = _weights(root, "live"), _weights(root, "cached")
    _same_weights(wl, wc)
    init = _init_weights()
    assert _moved(wc, init, "logit_scale") and _moved(wc, init, "visual.head.pool.proj.weight")
    assert any(_moved(wc, init, k) for k in wc if k.startswith("video_pool."))
    assert not any(_moved(wc, init, k) for k in wc if k.startswith(("visual.trunk.", "text.", "transformer.")))

    def refuse(*a, **k):
        raise AssertionError("computed or decoded on reuse")

    monkeypatch.setattr(frozen_features.FrozenFeatures, "_compute", refuse)
    monkeypatch.setattr(frame_store.LiveFrames, "load", refuse)
    monkeypatch.setattr(frame_store, "decode_frames", refuse)
    again = _run(root, "again", "--lock-image", "--lock-text", "--frozen-feature-cache", cache)
    assert "reusing the image tower's visual.trunk and the text tower" in again and "computed" not in again
    assert _bad_lines(again) == _bad_lines(live)
    _same_weights(wc, _weights(root, "again"))


@pytest.mark.slow
def test_image_only_locked_trains_text_on_cached_frames(data):
    root = data
    _run(root, "live_img", "--lock-image")
    log = _run(root, "cached_img", "--lock-image", "--frozen-feature-cache", root / "cache_img")
    assert "computed the image tower's visual.trunk in" in log
    m = json.loads((root / "cache_img" / "manifest.json").read_text())
    assert m["parts"] == {"image": "visual.trunk"} and "text" not in m["tables"] and "text" not in m
    wl, wc = _weights(root, "live_img"), _weights(root, "cached_img")
    _same_weights(wl, wc)
    text_key = next(k for k in wl if k.startswith(("text.", "transformer.")) and k.endswith("weight"))
    assert _moved(wc, _init_weights(), text_key)  # the text tower trained (live) on cached frames


def _init_weights():
    """Every run's initial weights (the trainer seeds with --seed 0, then builds the model); the
    frozen trunk, which no run changes, shows it is the same init."""
    from open_clip_train.models import create_model
    from open_clip_train.video import VideoModelCfg, attach_video

    torch.manual_seed(0)
    model, _ = create_model(MODEL)
    attach_video(model, VideoModelCfg(pooling="afa", max_frames=3))
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_unlock_switches_back_to_live_and_equals_the_live_run(data):
    root = data
    flags = ("--lock-image", "--lock-text", "--unfreeze-image-at-epoch", "1", "--unfreeze-text-at-epoch", "1",
             "--epochs", "2")
    live = _run(root, "live_unlock", *flags)
    log = _run(root, "cached_unlock", *flags, "--frozen-feature-cache", root / "cache_unlock")
    assert "frozen-feature cache: the image tower unlocks; its frozen outputs are computed live" in log
    assert "frozen-feature cache: the text tower unlocks" in log
    assert _bad_lines(log) == _bad_lines(live) and len(_bad_lines(log)) == 2
    wl, wc = _weights(root, "live_unlock", 2), _weights(root, "cached_unlock", 2)
    _same_weights(wl, wc)
    trunk = next(k for k in wc if k.startswith("visual.trunk.") and k.endswith("weight"))
    assert _moved(wc, _weights(root, "cached_unlock", 1), trunk)  # the trunk trained live after the unlock


def test_mismatch_and_blockers_are_one_error_line(data, capsys, tmp_path):
    root, cache = data, tmp_path / "cache"
    base = ("--lock-image", "--lock-text", "--frozen-feature-cache", cache, "--train-num-samples", "12")
    assert main(_argv(root, "mm0", *base)) == 0
    capsys.readouterr()
    err = _one_error_line(capsys, _argv(root, "mm1", *base, "--max-frames", "2"))
    assert "frames.max_frames is 3 in the cache but 2 for this run" in err
    assert not (root / "logs" / "mm1").exists()  # refused in pre-flight, before any run directory or model
    assert "text.max_words" in _one_error_line(capsys, _argv(root, "mm2", *base, "--max-words", "16"))
    assert "data.split" in _one_error_line(capsys, _argv(root, "mm3", *base, "--msrvtt-train-split", "7k"))
    store = tmp_path / "frames"
    shutil.copytree(root / "data" / "videos", tmp_path / "videos")
    err = _one_error_line(capsys, _argv(root, "mm4", *base, "--video-root", tmp_path / "videos"))
    assert "data.frames_source" in err
    # other frozen weights (another init seed): found once the model is built, before any step
    rc = main(_argv(root, "mm5", *base, "--seed", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --frozen-feature-cache") and "weights_sha256" in err[-1]
    assert sum(line.startswith("error: ") for line in err) == 1
    assert not (root / "logs" / "mm5" / "checkpoints" / "epoch_1.pt").exists()
    live_teacher = ("--distill", "--teacher-model", MODEL)
    assert "live teacher" in _one_error_line(capsys, _argv(root, "mm6", *base, *live_teacher))
    assert "locked" in _one_error_line(capsys, _argv(root, "mm7", "--frozen-feature-cache", tmp_path / "c2"))


def test_rank_shards_make_the_one_process_cache(data, tmp_path):
    """Two ranks' shards hold the one-process rows (each video and caption once), and the cache
    reads them back by id; the padding row is the part's output for the live run's zero frame."""
    from types import SimpleNamespace

    from open_clip_train.models import create_model, get_tokenizer
    from open_clip_train.video import VideoModelCfg, attach_video
    from open_clip_train.video.dataset import frame_transform
    from open_clip_train.frozen_features import text_rows
    from open_clip_train.video.feature_cache import FeatureCache, FeatureShardWriter, write_manifest
    from open_clip_train.video.frozen import VideoFrozenFeatures
    from open_clip_train.video.training import VideoCfg, get_video_data

    torch.manual_seed(0)
    model, _ = create_model(MODEL)
    attach_video(model, VideoModelCfg(pooling="mean", max_frames=3))
    model.requires_grad_(False).eval()
    video = VideoCfg(model=VideoModelCfg(pooling="mean", max_frames=3))
    cfg = SimpleNamespace(train_data=str(data / "data"), batch_size=4, coco_caption_sampling="all", seed=0,
                          workers=0, train_num_samples=None, val_data=None)
    dataset = get_video_data(cfg, video, frame_transform(model), get_tokenizer(MODEL), 0, 1)["train"] \
        .dataloader.dataset
    parts = {"image": "visual.trunk", "text": "text"}
    one, two = tmp_path / "one", tmp_path / "two"
    for out, size in ((one, 1), (two, 2)):
        ff = VideoFrozenFeatures(str(out), parts)
        bad = []
        for rank in range(size):
            work, b = ff._image_work(model, dataset, rank, size, "cpu", 0)
            bad += b
            work["text"] = text_rows(model, dataset, rank, size, "cpu")
            w = FeatureShardWriter(out, rank, {t: (len(i), tuple(f.shape[1:])) for t, (i, f) in work.items()})
            for t, (i, f) in work.items():
                w.add(t, i, f)
            w.finish()
        write_manifest(out, {"bad_videos": bad}, size, "float32")
    a, b = FeatureCache(one), FeatureCache(two)
    assert sorted(n for n, _ in b.manifest["bad_videos"]) == [3]
    videos = sorted(a.index["frames"])
    assert videos == sorted(b.index["frames"]) == [n for n in range(12) if n != 3]
    assert {r for r, _ in b.index["frames"].values()} == {0, 1}  # both ranks computed some
    sentences = dataset.pair_ids[:, 1].tolist()
    for table, ids in (("frames", videos), ("frame_mask", videos), ("text", sentences), ("pad", [0])):
        torch.testing.assert_close(b.get(table, ids), a.get(table, ids), rtol=1e-5, atol=1e-6)
    k = next(k for k in range(12) if not bool(dataset[int(dataset.offsets[k])][1].all()))
    frames, mask = dataset[int(dataset.offsets[k])][:2]  # a video shorter than --max-frames: padded rows
    with torch.no_grad():
        zero = model.visual.trunk(torch.zeros_like(frames[:1]))[0]
        live = model.visual.trunk(frames)
    torch.testing.assert_close(a.get("pad", [0])[0], zero, rtol=1e-5, atol=1e-6)
    number = int(dataset.pair_ids[int(dataset.offsets[k]), 0])
    row, m = a.get("frames", [number])[0], a.get("frame_mask", [number])[0].bool()
    assert torch.equal(m, mask)
    torch.testing.assert_close(row[m], live[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(row[~m], zero.expand_as(row[~m]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cached_video_teacher_with_cached_student_equals_live_student(data):
    """TeachCLIP with a teacher cache: the objective reads the teacher's targets by id, never the
    frames, so the student's frozen encoders can be cached too; same weights as the live encoders."""
    from open_clip_train.extract_teacher import main as extract
    from open_clip_train.models import create_model

    root = data
    torch.manual_seed(1)
    teacher, _ = create_model(MODEL)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    assert extract(["--dataset-type", "msrvtt", "--train-data", str(root / "data"), "--max-frames", "3",
                    "--teacher-model", MODEL, "--teacher-pretrained", str(root / "teacher.pt"), "--out",
                    str(root / "teacher_cache"), "--dtype", "float32", "--workers", "0"]) == 0
    flags = ("--lock-image", "--lock-text", "--distill", "--teacher-model", MODEL, "--teacher-cache",
             root / "teacher_cache", "--lr", "0.05")
    live = _run(root, "distill_live", *flags)
    log = _run(root, "distill_cached", *flags, "--frozen-feature-cache", root / "cache_distill")
    assert "computed the image tower's visual.trunk and the text tower" in log
    assert re.search(r"Distill_fine_loss", log) and _bad_lines(log) == _bad_lines(live)
    wl, wc = _weights(root, "distill_live"), _weights(root, "distill_cached")
    _same_weights(wl, wc)
    assert _moved(wc, _init_weights(), "video_pool.afa.fc1.weight")


def test_a_video_without_good_substitute_is_the_blank_video(tmp_path):
    """When a bad video's substitutes are all bad too, the live dataset yields all-zero frames with
    only frame 0 unmasked: the cache gives its padding row in every position and the same mask."""
    from open_clip_train.video.feature_cache import FeatureCache, FeatureShardWriter, write_manifest
    from open_clip_train.video.frozen import VideoFrozenFeatures

    rows, pad = torch.randn(2, 3, 4), torch.randn(4)
    w = FeatureShardWriter(tmp_path, 0, {"frames": (2, (3, 4)), "frame_mask": (2, (3,)), "pad": (1, (4,))})
    w.add("frames", [5, 7], rows)
    w.add("frame_mask", [5, 7], torch.tensor([[1.0, 1, 0], [1, 1, 1]]))
    w.add("pad", [0], pad[None])
    w.finish()
    write_manifest(tmp_path, {"bad_videos": [[9, "empty file"]]}, 1, "float32")
    ff = VideoFrozenFeatures(str(tmp_path), {"image": "visual"})
    ff.cache, ff._bad = FeatureCache(tmp_path), frozenset({9})
    frames, mask = ff._image_rows([7, 9, 5], torch.float32)
    assert torch.equal(frames[0], rows[1]) and torch.equal(frames[2], rows[0])
    assert torch.equal(frames[1], pad.expand(3, 4))
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    with pytest.raises(ValueError, match="not in the cache"):
        ff._image_rows([8], torch.float32)  # not bad, not cached: an error, not a blank


@pytest.mark.slow
def test_resume_continues_on_the_cache(data):
    root, cache = data, data / "cache_resume"
    flags = ("--lock-image", "--lock-text", "--frozen-feature-cache", cache, "--skip-scheduler", "--epochs", "2")
    _run(root, "whole", *flags)
    _run(root, "part", *flags[:-1], "1")
    log = _run(root, "part", *flags, "--resume", "latest")
    assert "resumed" in log and "reusing" in log
    _same_weights(_weights(root, "whole", 2), _weights(root, "part", 2))


@pytest.mark.slow
def test_whole_image_tower_locked_caches_its_features(data):
    """Image head locked too (--lock-pattern): the whole tower's output per frame is cached and
    only the video modules and the logit scale train (the text tower live)."""
    flags = ("--lock-pattern", r"^visual\.", "--train-num-samples", "36")
    _run(data, "live_visual", *flags)
    log = _run(data, "cached_visual", *flags, "--frozen-feature-cache", data / "cache_visual")
    assert "computed the image tower's visual in" in log
    m = json.loads((data / "cache_visual" / "manifest.json").read_text())
    assert m["parts"] == {"image": "visual"} and len(m["tables"]["frames"]["row_shape"]) == 2  # [T, D]
    _same_weights(_weights(data, "live_visual"), _weights(data, "cached_visual"))
