"""T2V / V2T metrics on hand-computed similarity matrices (text features = rows of S, video
features = the identity, so caption c scores S[c, v] against video v)."""
import pytest
import torch

from open_clip_train.video.metrics import format_seed, summarize, video_ranks, video_retrieval_metrics


def _ranks(S, t2v, chunk_size=1024):
    S = torch.tensor(S, dtype=torch.float32)
    return video_ranks(torch.eye(S.shape[1]), S, torch.tensor(t2v), chunk_size=chunk_size)


def test_one_caption_per_video_with_ties():
    S = [[0.9, 0.1, 0.5],   # caption 0 (video 0): rank 1
         [0.8, 0.3, 0.3],   # caption 1 (video 1): video 0 above, video 2 ties -> rank 3
         [0.2, 0.7, 0.6]]   # caption 2 (video 2): video 1 above -> rank 2
    t2v, v2t = _ranks(S, [0, 1, 2])
    assert t2v.tolist() == [1, 3, 2]
    # V2T on the transpose: video 0 column [0.9, 0.8, 0.2] -> 1; video 1 [0.1, 0.3, 0.7]: 0.7 above -> 2;
    # video 2 [0.5, 0.3, 0.6] -> 1
    assert v2t.tolist() == [1, 2, 1]
    m = summarize(t2v, v2t)
    assert m["msrvtt_t2v_R@1"] == pytest.approx(1 / 3) and m["msrvtt_t2v_R@5"] == 1.0
    assert m["msrvtt_t2v_median_rank"] == 2.0 and m["msrvtt_t2v_mean_rank"] == pytest.approx(2.0)
    assert m["msrvtt_v2t_R@1"] == pytest.approx(2 / 3) and m["msrvtt_v2t_mean_rank"] == pytest.approx(4 / 3)
    assert m["msrvtt_num_videos"] == 3 and m["msrvtt_num_captions"] == 3 and m["num_bad_videos"] == 0


def test_multi_caption_v2t_uses_the_best_caption_and_counts_every_negative_caption():
    # videos 0 and 1, two captions each (captions 0,1 -> video 0; 2,3 -> video 1)
    S = [[0.2, 0.9],
         [0.6, 0.1],
         [0.6, 0.5],
         [0.7, 0.8]]
    t2v, v2t = _ranks(S, [0, 0, 1, 1])
    # T2V per caption: c0 video1 0.9 > 0.2 -> 2; c1 -> 1; c2: video0 0.6 >= 0.5 -> 2; c3 -> 1
    assert t2v.tolist() == [2, 1, 2, 1]
    # V2T video 0: best own caption 0.6 (c1); negatives c2 = 0.6 (tie, counts) and c3 = 0.7 -> rank 3.
    # (CLIP4Clip's grouped V2T would compare against video 1's best caption only: rank 2.)
    # video 1: best own 0.8 (c3); negative c0 = 0.9 above -> rank 2
    assert v2t.tolist() == [3, 2]
    m = summarize(t2v, v2t)
    assert m["msrvtt_v2t_median_rank"] == 2.0  # lower median of [2, 3]
    assert m["msrvtt_num_videos"] == 2 and m["msrvtt_num_captions"] == 4


def _dense(video, text, t2v):
    """Reference: the full matrix, ties against the query."""
    S = text @ video.T  # [C, V]
    pos = S[torch.arange(len(t2v)), t2v]
    neg = torch.ones_like(S, dtype=torch.bool)
    neg[torch.arange(len(t2v)), t2v] = False
    t2v_r = ((S >= pos[:, None]) & neg).sum(1) + 1
    v2t_r = []
    for v in range(video.shape[0]):
        own = t2v == v
        best = S[own, v].max()
        v2t_r.append(int((S[~own, v] >= best).sum()) + 1)
    return t2v_r, torch.tensor(v2t_r)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_equals_dense_with_ties(chunk_size):
    g = torch.Generator().manual_seed(0)
    # quantised features give many exact ties
    video = torch.randint(-2, 3, (9, 4), generator=g).float()
    text = torch.randint(-2, 3, (31, 4), generator=g).float()
    t2v = torch.cat([torch.arange(9), torch.randint(0, 9, (22,), generator=g)])
    ref = _dense(video, text, t2v)
    got = video_ranks(video, text, t2v, chunk_size=chunk_size)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    rows = video_ranks(video, text, t2v, chunk_size=chunk_size, video_rows=slice(2, 5), text_rows=slice(10, 20))
    assert torch.equal(rows[0], ref[0][10:20]) and torch.equal(rows[1], ref[1][2:5])


def test_all_keys_and_seed_format():
    video = torch.eye(4)
    text = torch.eye(4)[[0, 1, 2, 3, 1]]
    m = video_retrieval_metrics(video, text, torch.tensor([0, 1, 2, 3, 0]), num_bad_videos=2)
    keys = {f"msrvtt_{d}_{k}" for d in ("t2v", "v2t")
            for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")}
    assert keys | {"msrvtt_num_videos", "msrvtt_num_captions", "num_bad_videos"} == set(m)
    assert m["num_bad_videos"] == 2
    seed = {"msrvtt_t2v_R@1": 0.034, "msrvtt_t2v_R@5": 0.087, "msrvtt_t2v_R@10": 0.125,
            "msrvtt_t2v_median_rank": 119.0, "msrvtt_t2v_mean_rank": 145.5,
            "msrvtt_v2t_R@1": 0.034, "msrvtt_v2t_R@5": 0.096, "msrvtt_v2t_R@10": 0.137,
            "msrvtt_v2t_median_rank": 118.0, "msrvtt_v2t_mean_rank": 145.7}
    assert format_seed(seed).splitlines() == [
        "Text-to-Video: R@1: 3.4 - R@5: 8.7 - R@10: 12.5 - Median R: 119.0 - Mean R: 145.5",
        "Video-to-Text: R@1: 3.4 - R@5: 9.6 - R@10: 13.7 - Median R: 118.0 - Mean R: 145.7"]
