import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from open_clip_train.retrieval import (
    ClipValLoss,
    i2t_ranks,
    pairwise_metrics,
    retrieval_metrics,
    summarize_ranks,
    t2i_ranks,
)

COCO_KEYS = {
    f"coco_{d}_{m}"
    for d in ("i2t", "t2i")
    for m in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")
}

# Hand-built case: 3 images, 7 captions.  Images are one-hot, so the score of
# (image i, caption j) is simply SCORES[i][j] and all arithmetic is exact.
TEXT_TO_IMAGE = [0, 0, 1, 1, 1, 2, 2]
SCORES = [
    # c0    c1     c2     c3    c4     c5     c6
    [0.25, 0.75, 0.5, 0.75, 0.125, 0.875, 0.0],  # img0: best positive is c1 (its 2nd caption)
    [0.5, 0.25, 0.625, 0.0, 0.25, 0.5, 0.375],   # img1
    [0.5, 0.75, 0.5, 0.25, 1.0, 0.5, 0.5],       # img2
]
# i2t: img0 best=.75 (c1); negatives >= .75: c3 (tie), c5 -> rank 3
#      img1 best=.625 (c2); no negative >= .625           -> rank 1
#      img2 best=.5 (c5/c6); c0 (tie), c1, c2 (tie), c4   -> rank 5
HAND_I2T = [3, 1, 5]
# t2i, per caption column: own image score vs the other two images
#   c0 own .25 < .5,.5 -> 3   c1 own .75 tie img2 -> 2   c2 .625 best -> 1
#   c3 own 0 < .75,.25 -> 3   c4 own .25 < 1.0 -> 2      c5 own .5 < .875, tie .5 -> 3
#   c6 own .5 best -> 1
HAND_T2I = [3, 2, 1, 3, 2, 3, 1]


def hand_features(dtype: torch.dtype = torch.float32):
    return torch.eye(3, dtype=dtype), torch.tensor(SCORES, dtype=dtype).T.contiguous()


def random_case(n: int, t: int, d: int, seed: int, integer: bool = False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(n), torch.randint(0, n, (t - n,), generator=g)])
    labels = labels[torch.randperm(t, generator=g)]
    if integer:  # small ints: exact dot products in any order and plenty of ties
        img = torch.randint(-2, 3, (n, d), generator=g).float()
        txt = torch.randint(-2, 3, (t, d), generator=g).float()
    else:
        img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
        txt = F.normalize(torch.randn(t, d, generator=g), dim=-1)
    return img, txt, labels


def loop_i2t(img, txt, labels):
    """Plain-loop reference: 1 + #negatives >= best positive."""
    s = (img @ txt.T).tolist()
    lab = labels.tolist()
    out = []
    for i, row in enumerate(s):
        best = max(v for v, l in zip(row, lab) if l == i)
        out.append(1 + sum(1 for v, l in zip(row, lab) if l != i and v >= best))
    return out


def loop_t2i(img, txt, labels):
    s = (txt @ img.T).tolist()
    out = []
    for row, own in zip(s, labels.tolist()):
        out.append(1 + sum(1 for i, v in enumerate(row) if i != own and v >= row[own]))
    return out


def upstream_clip_metrics(image_features, text_features, logit_scale):
    """open_clip 3.3.0 get_clip_metrics, restated."""
    metrics = {}
    logits_per_image = (logit_scale * image_features @ text_features.t()).detach().cpu()
    for name, logit in {"image_to_text": logits_per_image, "text_to_image": logits_per_image.t()}.items():
        ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == torch.arange(len(text_features)).view(-1, 1))[1].numpy()
        metrics[f"{name}_mean_rank"] = preds.mean() + 1
        metrics[f"{name}_median_rank"] = np.floor(np.median(preds)) + 1
        for k in [1, 5, 10]:
            metrics[f"{name}_R@{k}"] = np.mean(preds < k)
    return metrics


# ---- COCO protocol: hand-computed -------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_hand_i2t_ranks(chunk_size):
    img, txt = hand_features()
    assert i2t_ranks(img, txt, TEXT_TO_IMAGE, chunk_size=chunk_size).tolist() == HAND_I2T


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1024])
def test_hand_t2i_ranks(chunk_size):
    img, txt = hand_features()
    assert t2i_ranks(img, txt, TEXT_TO_IMAGE, chunk_size=chunk_size).tolist() == HAND_T2I


def test_hand_retrieval_metrics():
    img, txt = hand_features()
    m = retrieval_metrics(img, txt, torch.tensor(TEXT_TO_IMAGE))
    assert set(m) == COCO_KEYS
    assert all(type(v) is float for v in m.values())
    assert m["coco_i2t_R@1"] == pytest.approx(1 / 3)
    assert m["coco_i2t_R@5"] == 1.0 and m["coco_i2t_R@10"] == 1.0
    assert m["coco_i2t_median_rank"] == 3.0 and m["coco_i2t_mean_rank"] == 3.0
    assert m["coco_t2i_R@1"] == pytest.approx(2 / 7)
    assert m["coco_t2i_R@5"] == 1.0
    assert m["coco_t2i_median_rank"] == 2.0  # sorted 1,1,2,2,3,3,3
    assert m["coco_t2i_mean_rank"] == pytest.approx(15 / 7)


def test_tie_counts_against():
    # img0: positive c0 scores 1, negative c1 also 1 -> rank 2; img1: c1 1 vs c0 0 -> rank 1.
    # c1: own image img1 scores 1, img0 also 1 -> rank 2; c0: 1 vs 0 -> rank 1.
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert i2t_ranks(img, txt, [0, 1]).tolist() == [2, 1]
    assert t2i_ranks(img, txt, [0, 1]).tolist() == [1, 2]


def test_half_inputs_scored_in_float32():
    img, txt = hand_features(torch.float16)
    assert i2t_ranks(img, txt, TEXT_TO_IMAGE).tolist() == HAND_I2T
    assert t2i_ranks(img, txt, TEXT_TO_IMAGE).tolist() == HAND_T2I
    # 2049 + 1 is not representable in fp16: a half matmul would tie these.
    img = torch.tensor([[1.0, 1.0]], dtype=torch.float16)
    txt = torch.tensor([[2048.0, 1.0], [2048.0, 0.0]], dtype=torch.float16)
    assert i2t_ranks(img, txt, [0, 0]).tolist() == [1]
    img2 = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float16)
    assert t2i_ranks(img2, txt[:1], [0]).tolist() == [1]


def test_summarize_uses_lower_median():
    m = summarize_ranks(torch.tensor([1, 4]), torch.tensor([2, 3, 7, 9]))
    assert m["coco_i2t_median_rank"] == 1.0 and m["coco_t2i_median_rank"] == 3.0
    assert m["coco_i2t_mean_rank"] == 2.5 and m["coco_t2i_R@5"] == 0.5


# ---- COCO protocol: chunked vs dense, partial rows --------------------------------


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_matches_loop_reference(chunk_size, integer):
    img, txt, labels = random_case(23, 61, 8, seed=chunk_size, integer=integer)
    assert i2t_ranks(img, txt, labels, chunk_size=chunk_size).tolist() == loop_i2t(img, txt, labels)
    assert t2i_ranks(img, txt, labels, chunk_size=chunk_size).tolist() == loop_t2i(img, txt, labels)


def test_integer_case_really_has_ties():
    img, txt, labels = random_case(23, 61, 8, seed=0, integer=True)
    s = img @ txt.T
    assert s.unique().numel() < s.numel() // 10


@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_rows_partition_equals_full(chunk_size):
    img, txt, labels = random_case(19, 53, 6, seed=1, integer=True)
    full_i2t = i2t_ranks(img, txt, labels, chunk_size=chunk_size)
    full_t2i = t2i_ranks(img, txt, labels, chunk_size=chunk_size)
    parts_i2t = [i2t_ranks(img, txt, labels, rows=slice(a, b), chunk_size=chunk_size)
                 for a, b in [(0, 7), (7, 7), (7, 12), (12, None)]]
    parts_t2i = [t2i_ranks(img, txt, labels, rows=slice(a, b), chunk_size=chunk_size)
                 for a, b in [(0, 20), (20, 21), (21, None)]]
    assert torch.equal(torch.cat(parts_i2t), full_i2t)
    assert torch.equal(torch.cat(parts_t2i), full_t2i)
    assert torch.equal(i2t_ranks(img, txt, labels, rows=slice(1, None, 2)), full_i2t[1::2])
    assert summarize_ranks(torch.cat(parts_i2t), torch.cat(parts_t2i)) == retrieval_metrics(
        img, txt, labels, chunk_size=chunk_size
    )


class _ShapeSpy(TorchFunctionMode):
    """Records the shape of every tensor produced by a torch op."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append((func, tuple(out.shape)))
        return out


def test_never_materialises_more_than_a_chunk():
    n, t, d, chunk = 40, 150, 8, 16
    img, txt, labels = random_case(n, t, d, seed=2)
    with _ShapeSpy() as spy:
        retrieval_metrics(img, txt, labels, chunk_size=chunk)
    matmuls = ("matmul", "__matmul__", "mm")
    score_shapes = [s for f, s in spy.shapes if getattr(f, "__name__", "") in matmuls]
    assert score_shapes, "spy saw no matmul"
    assert max(a * b for a, b in score_shapes) <= chunk * chunk
    # No op at all produced anything score-matrix sized.
    assert all(math.prod(s) < n * t for _, s in spy.shapes)


def test_caption_less_image_allowed_for_t2i_only():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.6]])
    assert t2i_ranks(img, txt, [0, 1]).tolist() == [1, 2]  # image 2 is a distractor
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        i2t_ranks(img, txt, [0, 1])


# ---- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "img, txt, labels, kw, match",
    [
        (torch.randn(3, 4), torch.randn(5, 5), [0, 1, 2, 0, 1], {}, "feature dims differ"),
        (torch.randn(3), torch.randn(5, 3), [0, 1, 2, 0, 1], {}, "2-D"),
        (torch.randn(0, 4), torch.randn(5, 4), [0, 1, 2, 0, 1], {}, "empty"),
        (torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2, 0], {}, r"shape \[5\]"),
        (torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2, 0, 3], {}, r"\[0, 3\)"),
        (torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2, 0, -1], {}, r"\[0, 3\)"),
        (torch.randn(3, 4), torch.randn(5, 4), [0.0, 1.0, 2.0, 0.0, 1.0], {}, "integer"),
        (torch.randn(3, 4), torch.randn(5, 4), [0, 0, 0, 0, 0], {}, "2 of 3 images have no caption"),
        (torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2, 0, 1], {"chunk_size": 0}, "chunk_size"),
        (torch.full((3, 4), float("nan")), torch.randn(5, 4), [0, 1, 2, 0, 1], {}, "NaN"),
    ],
)
def test_bad_inputs_raise(img, txt, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(img, txt, labels, **kw)


def test_bad_rows_and_ranks_raise():
    img, txt = hand_features()
    with pytest.raises(ValueError, match="slice"):
        i2t_ranks(img, txt, TEXT_TO_IMAGE, rows=[0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        summarize_ranks(torch.tensor([], dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match=">= 1"):
        summarize_ranks(torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="one text per image"):
        pairwise_metrics(torch.randn(3, 4), torch.randn(4, 4), 1.0)


# ---- upstream-compatible pairwise metrics ------------------------------------------


@pytest.mark.parametrize("n, seed", [(7, 0), (64, 1), (101, 2)])
def test_pairwise_matches_upstream_formula(n, seed):
    img, txt, _ = random_case(n, n, 16, seed=seed)
    scale = torch.tensor(100.0)
    got = pairwise_metrics(img, txt, scale)
    want = upstream_clip_metrics(img, txt, scale)
    assert set(got) == set(want) and len(got) == 10
    assert all(type(v) is float for v in got.values())
    for k, v in want.items():
        assert got[k] == float(v), k


def test_pairwise_agrees_with_coco_for_one_caption_per_image():
    n = 31  # odd, so numpy's and torch's medians coincide
    img, txt, _ = random_case(n, n, 8, seed=3)
    pw = pairwise_metrics(img, txt, 1.0)
    coco = retrieval_metrics(img, txt, torch.arange(n))
    assert coco["coco_i2t_R@1"] < 1.0  # non-trivial case
    for up, ours in (("image_to_text", "coco_i2t"), ("text_to_image", "coco_t2i")):
        for m in ("R@1", "R@5", "R@10", "median_rank", "mean_rank"):
            assert pw[f"{up}_{m}"] == pytest.approx(coco[f"{ours}_{m}"]), (up, m)


def test_pairwise_is_deflated_for_multi_caption_data():
    n, per = 20, 5
    img = F.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(4)), dim=-1)
    labels = torch.arange(n).repeat_interleave(per)
    txt = img[labels].clone()  # perfect features: each caption equals its image
    coco = retrieval_metrics(img, txt, labels)
    assert coco["coco_i2t_R@1"] == 1.0 and coco["coco_t2i_R@1"] == 1.0
    pw = pairwise_metrics(img[labels], txt, 100.0)
    # each row's 5 same-image captions tie; only one can come first
    assert pw["image_to_text_R@1"] == pytest.approx(1 / per, abs=0.05)
    assert pw["text_to_image_R@1"] == pytest.approx(1 / per, abs=0.05)
    assert pw["image_to_text_R@5"] == 1.0


# ---- ClipValLoss ----------------------------------------------------------------------


def test_clip_val_loss_hand_computed():
    acc = ClipValLoss()
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    # batch 1, scale 2, identity: logits [[2,0],[0,2]] -> each CE = log(1 + e^-2)
    acc.update(torch.eye(2), torch.eye(2), torch.tensor([2.0, 2.0]))  # per-device copies averaged
    # batch 2, scale 1: logits [[1,0],[1,0]]
    #   i2t: row0 -log(e/(e+1)) = log(1+e^-1), row1 -log(1/(e+1)) = log(1+e)
    #   t2i: logits.T = [[1,1],[0,0]] -> log 2 for both rows
    acc.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.eye(2), 1.0)
    # batch 3: a single pair has zero loss
    acc.update(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]]), 3.0)
    b1 = math.log(1 + math.exp(-2))
    b2 = ((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2 + math.log(2)) / 2
    assert acc.compute() == pytest.approx((2 * b1 + 2 * b2 + 1 * 0.0) / 5, rel=1e-6)


def test_clip_val_loss_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        ClipValLoss().update(torch.randn(2, 4), torch.randn(3, 4), 1.0)


def test_pairwise_chunked_equals_dense_upstream_form():
    """Above the dense limit, pairwise positions are counted in chunks; same values absent ties."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(53, 16, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(53, 16, generator=g), dim=-1)
    dense = pairwise_metrics(img, txt, 100.0)
    chunked = pairwise_metrics(img, txt, 100.0, dense_limit=10, chunk_size=7)
    assert chunked == pytest.approx(dense)
    assert dense["image_to_text_R@1"] < 1.0  # the case is not trivial
