"""MSR-VTT annotations, training samples with bad-video substitution, evaluation data."""
import csv
import json

import numpy as np
import pytest
import torch
from torchvision import transforms

from open_clip_train.data.bad_samples import BadTally, MISSING
from open_clip_train.video import msrvtt
from open_clip_train.video.dataset import WordLimitedTokenizer, build_eval, build_train
from open_clip_train.video.frames import UNDECODABLE_VIDEO, BadVideo


def _write_msrvtt(root, videos, per_video=3, test_split=("video3", "video4")):
    root.mkdir(parents=True, exist_ok=True)
    data = {"videos": [{"video_id": v, "split": "test" if v in test_split else "train"} for v in videos],
            "sentences": []}
    for v in reversed(videos):  # out of order on purpose: captions are sorted by sen_id
        for k in reversed(range(per_video)):
            data["sentences"].append({"video_id": v, "caption": f" {v} caption {k} ", "sen_id": int(v[5:]) * 10 + k})
    (root / "MSRVTT_data.json").write_text(json.dumps(data))
    with (root / "MSRVTT_train.9k.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["video_id"], *[[v] for v in videos if v not in test_split]])
    with (root / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["key", "vid_key", "video_id", "sentence"],
                                 *[[f"ret{i}", f"msr{v[5:]}", v, f"{v} test"] for i, v in enumerate(test_split)]])


def test_splits(tmp_path):
    _write_msrvtt(tmp_path, ["video0", "video1", "video2", "video3", "video4", "video10"],
                  test_split=("video10", "video3"))
    train = msrvtt.train_split(tmp_path, "9k")
    assert train.video_ids == ["video0", "video1", "video2", "video4"]
    assert train.captions[1] == ["video1 caption 0", "video1 caption 1", "video1 caption 2"]
    assert train.sentence_ids[1] == [10, 11, 12]
    assert train.text_to_video().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert train.pair_ids()[4].tolist() == [1, 11] and train.pair_ids()[-1].tolist() == [4, 42]
    full = msrvtt.test_split(tmp_path, "full")
    assert full.video_ids == ["video3", "video10"] and full.num_captions == 6
    one_k = msrvtt.test_split(tmp_path, "1k-A")
    assert one_k.video_ids == ["video10", "video3"] and one_k.captions == [["video10 test"], ["video3 test"]]
    assert one_k.sentence_ids == [[0], [1]]
    with pytest.raises(ValueError, match="MSRVTT_train.7k.csv"):
        msrvtt.train_split(tmp_path, "7k")
    with pytest.raises(ValueError, match="unknown MSR-VTT test split"):
        msrvtt.test_split(tmp_path, "2k")


class FakeFrames:
    """Video k has k+1 frames whose pixels are all k (k = the number in video<k>); some are bad."""

    def __init__(self, bad):
        self.bad = bad

    def load(self, vid):
        if vid in self.bad:
            raise BadVideo(self.bad[vid], vid)
        k = int(vid[5:])
        return np.full((min(k + 1, 4), 2, 2, 3), k, dtype=np.uint8)

    def name(self, vid):
        return f"videos/{vid}.mp4"


TO_TENSOR = transforms.Compose([transforms.Resize(2), transforms.CenterCrop(2), transforms.PILToTensor()])


def fake_tokenizer(texts, context_length=8):
    return torch.tensor([[len(t), *[hash(t) % 97] * (context_length - 1)] for t in texts])


def _items(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
    return out


def test_training_batches_substitute_bad_videos_deterministically():
    videos = [f"video{k}" for k in range(6)]
    split = msrvtt.VideoCaptions(videos, [[f"{v} a", f"{v} b"] for v in videos], [[2 * k, 2 * k + 1] for k in range(6)])
    frames = FakeFrames({"video2": MISSING, "video4": UNDECODABLE_VIDEO})
    loaders = [build_train(split, frames, TO_TENSOR, fake_tokenizer, max_frames=4, batch_size=bs, seed=3,
                           rank=r, world_size=ws) for bs, ws, r in ((12, 1, 0), (6, 2, 0), (6, 2, 1))]
    one = _items(*loaders[0], epoch=1)
    two = [b for pair in zip(_items(*loaders[1], epoch=1), _items(*loaders[2], epoch=1)) for b in pair]
    tally = BadTally()
    for batch in one:
        tally.add(batch.bad)
        pixels, mask, tokens, ids = batch
        assert pixels.shape == (12, 4, 3, 2, 2) and mask.dtype == torch.bool
        # each sample is consistent: its pixels are its video's number, its ids name that video
        for p, m, i in zip(pixels, mask, ids):
            k = int(i[0])
            assert k not in (2, 4) and int(m.sum()) == min(k + 1, 4)
            assert (p[m] == k).all() and not p[~m].any()
            assert i[1] // 2 == k
    assert tally.counts == {MISSING: 2, UNDECODABLE_VIDEO: 2}  # each bad video has two captions
    # the same samples and substitutes with 2 ranks x 6 as with 1 rank x 12
    torch.testing.assert_close(torch.cat([b[3] for b in one]), torch.cat([torch.cat([a[3], b[3]]) for a, b in
                                                                          zip(two[0::2], two[1::2])]))
    again = _items(*loaders[0], epoch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) for a, b in zip(one, again))


def test_random_caption_sampling_is_one_per_video():
    videos = [f"video{k}" for k in range(4)]
    split = msrvtt.VideoCaptions(videos, [[f"{v} {c}" for c in "abc"] for v in videos], [[0, 1, 2]] * 4)
    loader, sampler = build_train(split, FakeFrames({}), TO_TENSOR, fake_tokenizer, max_frames=4, batch_size=4,
                                  caption_sampling="random")
    (batch,) = _items(loader, sampler, 0)
    assert sorted(batch[3][:, 0].tolist()) == [0, 1, 2, 3]


def test_eval_data_leaves_bad_videos_to_the_loop_and_drops_empty_captions():
    videos = ["video0", "video1", "video2"]
    split = msrvtt.VideoCaptions(videos, [["x", ""], ["y"], [""]], [[0, 1], [2], [3]])
    data = build_eval(split, FakeFrames({"video1": MISSING}), TO_TENSOR, fake_tokenizer, max_frames=4)
    assert data.videos.video_ids == ["video0", "video1"] and data.text_to_video.tolist() == [0, 1]
    assert data.dropped.total == 2 and data.texts.shape == (2, 8)
    batches = list(data.video_loader(0, 1, 2, 0))
    (batch,) = batches
    assert batch[2].tolist() == [0, 1] and [b.index for b in batch.bad] == [1]
    assert batch.bad[0].reason == MISSING and batch.bad[0].source == "videos/video1.mp4"
    shards = [list(data.video_loader(r, 2, 4, 0))[0][2].tolist() for r in (0, 1)]
    assert shards == [[0], [1]]


def test_word_limited_tokenizer():
    import open_clip

    tok = open_clip.get_tokenizer("RN50")  # the CLIP BPE tokenizer (local vocabulary file)
    words = " ".join(["dog"] * 50)
    limited = WordLimitedTokenizer(tok, 8, 77)([words, "a cat"])
    assert limited.shape == (2, 77)
    full = tok([words])[0]
    assert limited[0, :7].tolist() == full[:7].tolist() and limited[0, 7] == tok.eot_token_id
    assert not limited[0, 8:].any()
    assert limited[1].tolist() == tok(["a cat"])[0].tolist()
    with pytest.raises(ValueError, match="max_words"):
        WordLimitedTokenizer(tok, 100, 77)
