"""Frozen-encoder feature cache: round trip by id across shards, exact in float32; manifest and
coverage checks; weights hash."""
import pytest
import torch
from torch import nn

from open_clip_train.video.feature_cache import (
    FeatureCache,
    FeatureShardWriter,
    tensors_sha256,
    write_manifest,
)


def frozen_part():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16)).eval().requires_grad_(False)


def build(tmp_path, dtype="float32"):
    part = frozen_part()
    frames = torch.randn(5, 3, 3, 8, 8)  # 5 videos x 3 frames
    tokens_out = torch.randn(4, 16)  # a frozen text tower's outputs for 4 captions
    with torch.no_grad():
        per_frame = part(frames.flatten(0, 1)).reshape(5, 3, 16)
    vids, caps = [f"video{i}" for i in range(5)], [7, 3, 11, 5]
    split = {0: ([0, 3], [0, 1]), 1: ([1, 2, 4], [2, 3])}
    for rank, (v, c) in split.items():
        w = FeatureShardWriter(tmp_path, rank, {"frames": (len(v), (3, 16)), "text": (len(c), (16,))}, dtype)
        w.add("frames", [vids[i] for i in v], per_frame[v])
        w.add("text", [caps[i] for i in c], tokens_out[c])
        w.finish()
    meta = {"part": {"name": "visual.trunk", "weights_sha256": tensors_sha256(part)},
            "input": {"image_size": [8, 8], "frames": {"fps": 1, "max_frames": 3}, "augment": False},
            "data": {"root": "/data/msrvtt"}}
    return write_manifest(tmp_path, meta, 2, dtype), meta, per_frame, tokens_out, part


def test_round_trip_is_exact_and_ordered(tmp_path):
    manifest, meta, per_frame, text, _ = build(tmp_path)
    assert manifest["tables"] == {"frames": {"row_shape": [3, 16], "rows": 5}, "text": {"row_shape": [16], "rows": 4}}
    cache = FeatureCache(tmp_path)
    cache.check(meta)
    got = cache.get("frames", ["video4", "video0", "video4", "video2"])
    assert got.dtype == torch.float32 and torch.equal(got, per_frame[[4, 0, 4, 2]])
    assert torch.equal(cache.get("text", [5, 7]), text[[3, 0]])


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_storage(tmp_path, dtype, torch_dtype):
    _, _, per_frame, _, _ = build(tmp_path, dtype)
    got = FeatureCache(tmp_path).get("frames", ["video1", "video3"])
    assert got.dtype == torch_dtype and torch.equal(got, per_frame[[1, 3]].to(torch_dtype))


def test_mismatch_and_missing_ids_are_one_line_errors(tmp_path):
    _, meta, _, _, part = build(tmp_path)
    cache = FeatureCache(tmp_path)
    with torch.no_grad():
        part[1].weight[0, 0] += 1  # the "frozen" part changed: its outputs are stale
    with pytest.raises(ValueError, match=r"part\.weights_sha256 is '.*' in the cache but '.*' for this run"):
        cache.check({"part": {"weights_sha256": tensors_sha256(part)}})
    with pytest.raises(ValueError, match=r"input\.augment is False in the cache but True"):
        cache.check({"input.augment": True})
    with pytest.raises(ValueError, match=r"2 of 3 frames ids of the training set are not in the cache \(ids video8, "
                                         r"video9\)"):
        cache.check_covers("frames", ["video0", "video9", "video8"])
    with pytest.raises(ValueError, match="no table 'image'"):
        cache.get("image", [1])
    with pytest.raises(ValueError, match="no manifest.json"):
        FeatureCache(tmp_path / "nothing")


def test_writer_rejects_bad_rows(tmp_path):
    w = FeatureShardWriter(tmp_path, 0, {"text": (2, (4,))})
    with pytest.raises(ValueError, match=r"rows are \(4,\)"):
        w.add("text", [1, 2], torch.zeros(2, 5))
    w.add("text", [1], torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="1 of 2 text rows written"):
        w.finish()


def test_weights_hash_sees_values_names_and_dtypes():
    a = frozen_part()
    assert tensors_sha256(a) == tensors_sha256(frozen_part())
    assert tensors_sha256(a) != tensors_sha256(a.double())
    assert tensors_sha256({"w": torch.zeros(2)}) != tensors_sha256({"v": torch.zeros(2)})
