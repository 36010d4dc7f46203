"""TeachCLIP objective: each term against plain-numpy formulas written out element by element."""
import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from open_clip_train.video.distill_loss import (
    VideoDistillCfg,
    VideoDistillLoss,
    coarse_loss,
    contrastive_loss,
    fine_loss,
    masked_softmax,
)

S = np.array([[3.0, 1.0, -0.5], [0.2, 2.5, 0.1], [-1.0, 0.4, 1.7]])  # student [text, video]
T1 = np.array([[2.0, 0.5, 0.0], [1.0, 3.0, -1.0], [0.0, 0.0, 2.0]])  # teacher 1
T2 = np.array([[1.0, 1.2, 0.3], [0.0, 1.0, 0.5], [-2.0, 1.0, 0.4]])  # teacher 2


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def np_softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def np_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    num = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return num / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def np_pear(s, q):
    total = 0.0
    for m_s, m_q in ((s, q), (s.T, q.T)):
        rows = [1 - np_pearson(np_softmax(a), np_softmax(b)) for a, b in zip(m_s, m_q)]
        total += sum(rows) / len(rows)
    return total


def np_ce(s, q):
    total = 0.0
    for m_s, m_q in ((s, q), (s.T, q.T)):
        terms = [-pq * math.log(ps) for a, b in zip(m_s, m_q) for ps, pq in zip(np_softmax(a), np_softmax(b))]
        total += sum(terms) / len(terms)
    return total


def np_smooth_l1(a, b):
    d = [abs(x - y) for x, y in zip(np.ravel(a), np.ravel(b))]
    return sum(0.5 * v * v if v < 1 else v - 0.5 for v in d) / len(d)


def test_contrastive_is_symmetric_infonce_and_clip_loss():
    want = 0.0
    for m in (S, S.T):
        want += sum(-math.log(np_softmax(row)[i]) for i, row in enumerate(m)) / len(m) / 2
    assert contrastive_loss(t(S)).item() == pytest.approx(want, rel=1e-12)
    # open_clip's ClipLoss on features that give those logits
    torch.manual_seed(0)
    img, txt = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1), \
        torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ref = ClipLoss()(img, txt, scale)
    assert contrastive_loss(scale * txt @ img.T).item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize("method,formula", [("pear", np_pear), ("ce", np_ce), ("l1", np_smooth_l1)])
def test_coarse_matches_hand_formula(method, formula):
    assert coarse_loss(t(S), t(T1), method).item() == pytest.approx(formula(S, T1), rel=1e-12)


def test_coarse_pear_is_zero_for_identical_and_positive_otherwise():
    assert coarse_loss(t(S), t(S), "pear").item() == pytest.approx(0.0, abs=1e-12)
    assert coarse_loss(t(S), t(T1), "pear").item() > 0.01


MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
SCORES = np.array([[0.1, 0.9, -0.3, 0.4], [1.0, -1.0, 5.0, 7.0], [0.3, 9.0, 9.0, 9.0]])
REL = np.array([[0.1, 0.4, 0.2, 0.3], [0.7, 0.3, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def np_masked_softmax(scores, mask):
    out = np.zeros_like(scores)
    for i in range(len(scores)):
        valid = [j for j in range(scores.shape[1]) if mask[i, j]]
        e = [math.exp(scores[i, j]) for j in valid]
        for j, v in zip(valid, e):
            out[i, j] = v / sum(e)
    return out


def test_masked_softmax_excludes_padding():
    got = masked_softmax(t(SCORES), torch.tensor(MASK)).numpy()
    np.testing.assert_allclose(got, np_masked_softmax(SCORES, MASK), rtol=1e-12, atol=0)
    assert (got[~MASK] == 0).all()


def test_fine_losses_over_valid_frames_only():
    p = np_masked_softmax(SCORES, MASK)
    valid = [(i, j) for i in range(3) for j in range(4) if MASK[i, j]]
    want_ce = sum(-REL[i, j] * math.log(p[i, j]) for i, j in valid) / len(valid)
    want_l1 = np_smooth_l1([p[i, j] for i, j in valid], [REL[i, j] for i, j in valid])
    rows = [i for i in range(3) if MASK[i].sum() >= 2]  # a one-frame video has nothing to correlate
    want_pear = sum(1 - np_pearson([p[i, j] for j in range(4) if MASK[i, j]],
                                   [REL[i, j] for j in range(4) if MASK[i, j]]) for i in rows) / len(rows)
    w, r, m = t(p), t(REL), torch.tensor(MASK)
    assert fine_loss(w, r, m, "ce").item() == pytest.approx(want_ce, rel=1e-12)
    assert fine_loss(w, r, m, "l1").item() == pytest.approx(want_l1, rel=1e-12)
    assert fine_loss(w, r, m, "pear").item() == pytest.approx(want_pear, rel=1e-12)


def test_fine_pear_gradient_is_finite_with_one_frame_videos():
    scores = t(SCORES).requires_grad_()
    loss = fine_loss(masked_softmax(scores, torch.tensor(MASK)), t(REL), torch.tensor(MASK), "pear")
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[torch.tensor(~MASK)] == 0).all() and scores.grad[0].abs().sum() > 0


def test_video_distill_loss_weights_and_teacher_average():
    mask = torch.tensor(MASK[:, :3])
    scores = t(SCORES[:, :3])
    rel2 = np_masked_softmax(np.array([[0.5, 0.1, 0.2], [0.3, 0.9, 0.0], [1.0, 1.0, 1.0]]), MASK[:, :3])
    rel1 = np_masked_softmax(REL[:, :3] + 0.1, MASK[:, :3])
    p = np_masked_softmax(SCORES[:, :3], MASK[:, :3])
    valid = [(i, j) for i in range(3) for j in range(3) if MASK[i, j]]

    def ce_fine(rel):
        return sum(-rel[i, j] * math.log(p[i, j]) for i, j in valid) / len(valid)

    gt = sum(-math.log(np_softmax(row)[i]) for m in (S, S.T) for i, row in enumerate(m)) / 6
    out = VideoDistillLoss()(t(S), scores, mask, [t(T1), t(T2)], [t(rel1), t(rel2)])
    assert set(out) == {"contrastive_loss", "distill_coarse_loss", "distill_fine_loss"}
    # TeachCLIP's pear weights: 0.2 ground truth, 1.0 coarse, 2.0 fine
    assert out["contrastive_loss"].item() == pytest.approx(0.2 * gt, rel=1e-12)
    assert out["distill_coarse_loss"].item() == pytest.approx((np_pear(S, T1) + np_pear(S, T2)) / 2, rel=1e-12)
    assert out["distill_fine_loss"].item() == pytest.approx(2.0 * (ce_fine(rel1) + ce_fine(rel2)) / 2, rel=1e-12)
    # ce coarse: 1 / 10 / 1; explicit weights override
    out = VideoDistillLoss(VideoDistillCfg(coarse="ce", fine="ce"))(t(S), scores, mask, [t(T1)], [t(rel1)])
    assert out["contrastive_loss"].item() == pytest.approx(gt, rel=1e-12)
    assert out["distill_coarse_loss"].item() == pytest.approx(10 * np_ce(S, T1), rel=1e-12)
    assert out["distill_fine_loss"].item() == pytest.approx(ce_fine(rel1), rel=1e-12)
    cfg = VideoDistillCfg(gt_weight=0.5, coarse_weight=0.0, fine_weight=3.0)
    out = VideoDistillLoss(cfg)(t(S), scores, mask, [t(T1)], [t(rel1)])
    assert out["contrastive_loss"].item() == pytest.approx(0.5 * gt, rel=1e-12)
    assert out["distill_coarse_loss"].item() == 0.0
    assert out["distill_fine_loss"].item() == pytest.approx(3 * ce_fine(rel1), rel=1e-12)
    # no teacher: the ground truth alone
    assert set(VideoDistillLoss()(t(S), None, None)) == {"contrastive_loss"}


def test_bad_methods_and_shapes_are_value_errors():
    with pytest.raises(ValueError, match="coarse distillation method"):
        VideoDistillCfg(coarse="kl")
    with pytest.raises(ValueError, match="fine distillation method"):
        fine_loss(t(REL), t(REL), torch.tensor(MASK), "mse")
    with pytest.raises(ValueError, match="teacher similarity"):
        coarse_loss(t(S), t(S[:2, :2]))
    with pytest.raises(ValueError, match="gt_weight"):
        VideoDistillCfg(gt_weight=-1)
