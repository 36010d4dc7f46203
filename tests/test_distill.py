"""Distillation loss, teacher, sharing plan, head alignment (tiny models, CPU, seconds)."""
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import open_clip
import open_clip_train.models
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from open_clip_train.distill import (
    DistillCfg,
    DistillLoss,
    TokenizerPair,
    TrunkCapture,
    concat_outputs,
    merge_micro_batch,
)
from open_clip_train.distill.headalign import HeadAlignCfg, HeadAlignLoss, build_reference_head, read_head_state
from open_clip_train.models import create_model, get_tokenizer
from open_clip_train.distill.sharing import plan_sharing
from open_clip_train.distill.teacher import Teacher, TeacherRunner

from launch import free_port

STUDENT = "tiny-convnext-cliptext"  # attention-pool head
TEACHER = "tiny-convnext-cliptext-linear"  # same trunk and text tower, open_clip's pooled linear head
TEACHER_32 = "tiny-convnext-cliptext-linear-s32"  # same, but 32px input


def _tiny_cfg(image_size: int) -> dict:
    cfg = json.loads((Path(open_clip_train.models.__file__).parent / "model_configs/tiny-convnext-cliptext.json")
                     .read_text())
    cfg["vision_cfg"].update(timm_pool="", timm_proj="linear", image_size=image_size)
    return cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 'pretrained' linear-head checkpoint (the convnext_base_w role), registered configs."""
    d = tmp_path_factory.mktemp("cfgs")
    for name, size in ((TEACHER, 64), (TEACHER_32, 32)):
        (d / f"{name}.json").write_text(json.dumps(_tiny_cfg(size)))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model, _ = create_model(TEACHER)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    path = d / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher(ckpt) -> Teacher:
    return Teacher.from_pretrained(TEACHER, str(ckpt))


def locked_student(ckpt: Path) -> torch.nn.Module:
    """Student loaded from the teacher checkpoint: trunk + text loaded and frozen, new head trainable."""
    torch.manual_seed(1)
    model, report = create_model(STUDENT, pretrained=str(ckpt))
    assert all(k.startswith("visual.head.") for k in report.missing)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("visual.head."))
    return model.eval()


def batch(n: int = 4, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = get_tokenizer(STUDENT)([f"a photo of thing number {i}" for i in range(n)])
    return images, tokens


# ---------------------------------------------------------------------------------------------
# loss


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_distill_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    si, st, ti, tt = (_unit(rng, 3, 4) for _ in range(4))
    s_scale, t_scale, weight, temp = 10.0, 5.0, 0.5, 2.0

    def softmax(m):
        e = np.exp(m - m.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    S, T = s_scale * si @ st.T, t_scale * ti @ tt.T
    ce = lambda m: -np.mean([np.log(softmax(m)[i, i]) for i in range(3)])  # noqa: E731
    kl = lambda p_logits, q_logits: temp ** 2 * np.mean(  # noqa: E731
        (softmax(p_logits / temp) * np.log(softmax(p_logits / temp) / softmax(q_logits / temp))).sum(axis=1))
    want_contrastive = (ce(S) + ce(S.T)) / 2
    want_distill = weight * (kl(T, S) + kl(T.T, S.T)) / 2

    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    terms = DistillLoss(weight, temp)(
        {"image_features": t(si), "text_features": t(st), "logit_scale": t(s_scale)},
        {"image_features": t(ti), "text_features": t(tt), "logit_scale": t(t_scale)},
    )
    assert set(terms) == {"contrastive_loss", "distill_loss"}
    assert terms["contrastive_loss"].item() == pytest.approx(want_contrastive, rel=1e-6)
    assert terms["distill_loss"].item() == pytest.approx(want_distill, rel=1e-5)
    # a student equal to its teacher has nothing left to learn
    same = {"image_features": t(ti), "text_features": t(tt), "logit_scale": t(t_scale)}
    assert DistillLoss(1.0, temp)(same, same)["distill_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_distill_gradient_equals_upstream_at_temperature_one():
    """KL and upstream's teacher/student cross-entropy differ by the teacher entropy only."""
    torch.manual_seed(0)
    si, st = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    ti, tt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    grads = []
    for ours in (True, False):
        a, b = si.clone().requires_grad_(), st.clone().requires_grad_()
        if ours:
            loss = DistillLoss()({"image_features": a, "text_features": b, "logit_scale": torch.tensor(10.0)},
                                 {"image_features": ti, "text_features": tt, "logit_scale": torch.tensor(7.0)})
        else:
            loss = DistillClipLoss()(a, b, torch.tensor(10.0), ti, tt, torch.tensor(7.0), output_dict=True)
        loss["distill_loss"].backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_accumulation_with_cached_teacher_equals_full_batch():
    """Gradient cache over 2 micro-batches (features in, named terms out) = one full batch."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 8)
    x_img, x_txt = torch.randn(8, 6), torch.randn(8, 6)
    teacher = {"image_features": F.normalize(torch.randn(8, 8), dim=-1),
               "text_features": F.normalize(torch.randn(8, 8), dim=-1), "logit_scale": torch.tensor(5.0)}
    loss = DistillLoss(0.7, 2.0)

    def forward(i, t):
        return {"image_features": F.normalize(net(i), dim=-1), "text_features": F.normalize(net(t), dim=-1),
                "logit_scale": torch.tensor(10.0)}

    full = loss(forward(x_img, x_txt), teacher)
    sum(full.values()).backward()
    want = net.weight.grad.clone()
    net.zero_grad()

    micro = [(x_img[:4], x_txt[:4]), (x_img[4:], x_txt[4:])]
    teacher_parts = [{k: (v[:4] if v.ndim else v) for k, v in teacher.items()},
                     {k: (v[4:] if v.ndim else v) for k, v in teacher.items()}]
    with torch.no_grad():
        cached = [forward(i, t) for i, t in micro]
    t_all = concat_outputs(teacher_parts)
    for j, (i, t) in enumerate(micro):
        terms = loss(merge_micro_batch(cached, j, forward(i, t)), t_all)
        torch.testing.assert_close(terms["distill_loss"], full["distill_loss"])
        sum(terms.values()).backward()
    torch.testing.assert_close(net.weight.grad, want)


def _ddp_worker(rank: int, world: int, port: int, data: dict, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = data["s_img"].shape[0] // world
        rows = slice(rank * n, (rank + 1) * n)
        results = {}
        for local, with_grad in ((False, False), (True, True)):
            a = data["s_img"][rows].clone().requires_grad_()
            b = data["s_txt"][rows].clone().requires_grad_()
            terms = DistillLoss(0.5, 2.0, local_loss=local, gather_with_grad=with_grad, rank=rank, world_size=world)(
                {"image_features": a, "text_features": b, "logit_scale": torch.tensor(10.0)},
                {"image_features": data["t_img"][rows], "text_features": data["t_txt"][rows],
                 "logit_scale": torch.tensor(5.0)})
            sum(terms.values()).backward()
            results[local] = ({k: v.detach() for k, v in terms.items()}, a.grad, b.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    torch.manual_seed(0)
    data = {k: F.normalize(torch.randn(8, 6), dim=-1) for k in ("s_img", "s_txt", "t_img", "t_txt")}
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), data, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    a, b = data["s_img"].clone().requires_grad_(), data["s_txt"].clone().requires_grad_()
    ref = DistillLoss(0.5, 2.0)({"image_features": a, "text_features": b, "logit_scale": torch.tensor(10.0)},
                                {"image_features": data["t_img"], "text_features": data["t_txt"],
                                 "logit_scale": torch.tensor(5.0)})
    sum(ref.values()).backward()
    for k in ref:
        for r in ranks:  # global logits on every rank
            torch.testing.assert_close(r[False][0][k], ref[k].detach())
        # local rows against all columns: the mean over ranks is the global loss ...
        torch.testing.assert_close((ranks[0][True][0][k] + ranks[1][True][0][k]) / 2, ref[k].detach())
    # ... and with gradients through the gather, DDP's mean gives the global gradient
    grad_img = torch.cat([ranks[r][True][1] for r in range(2)]) / 2
    grad_txt = torch.cat([ranks[r][True][2] for r in range(2)]) / 2
    torch.testing.assert_close(grad_img, a.grad)
    torch.testing.assert_close(grad_txt, b.grad)


def test_configs_validate():
    with pytest.raises(ValueError, match="temperature"):
        DistillCfg(teacher_model="x", teacher_pretrained="p", temperature=0)
    with pytest.raises(ValueError, match="teacher-pretrained"):
        DistillCfg(teacher_model="x")
    assert DistillCfg(teacher_model="x", teacher_cache="dir").teacher_pretrained is None
    with pytest.raises(ValueError, match="mode"):
        HeadAlignCfg(mode="l2")


# ---------------------------------------------------------------------------------------------
# teacher


def test_teacher_is_frozen_eval_and_gets_no_gradients(teacher, ckpt):
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    teacher.model.train()  # even the inner model: encode puts it back
    student = locked_student(ckpt)
    images, tokens = batch()
    t_out = teacher.encode(images, tokens)
    assert not any(m.training for m in teacher.modules())
    assert all(not v.requires_grad for v in t_out.values())
    terms = DistillLoss()(student(images, tokens), t_out)
    sum(terms.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.visual.head.pool.qkv.weight.grad is not None


def test_teacher_needs_all_its_weights(ckpt, tmp_path):
    state = torch.load(ckpt)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, partial)
    with pytest.raises(ValueError, match="do not fit"):
        Teacher.from_pretrained(TEACHER, str(partial))
    with pytest.raises(ValueError, match="teacher-pretrained"):
        Teacher.from_pretrained(TEACHER, "")


def test_tokenizer_pair(gpt2_tokenizer_dir):
    clip_tok = get_tokenizer(STUDENT)
    pair = TokenizerPair(get_tokenizer("tiny-convnext-gpt2", str(gpt2_tokenizer_dir)), clip_tok)
    texts = ["a red car", "two cats on a bench"]
    s, t = pair(texts)
    assert not pair.same
    assert torch.equal(t, clip_tok(texts)) and not torch.equal(s, t)
    js, jt = pair.split(torch.stack([pair.joint([x])[0] for x in texts]))  # per-sample, as a dataset does
    assert torch.equal(js, s) and torch.equal(jt, t)
    images, cs, ct = pair.collate([(torch.zeros(3, 8, 8), x) for x in texts])
    assert images.shape == (2, 3, 8, 8) and torch.equal(cs, s) and torch.equal(ct, t)

    same = TokenizerPair(clip_tok, get_tokenizer(STUDENT))
    assert same.same
    s, t = same(texts)
    assert t is s


# ---------------------------------------------------------------------------------------------
# sharing


class _Count:
    def __init__(self, module):
        self.n = 0
        module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_shared_trunk_and_text_equal_full_teacher(ckpt):
    teacher = Teacher.from_pretrained(TEACHER, str(ckpt))
    student = locked_student(ckpt)
    plan = plan_sharing(student, teacher, student_preprocess_is_augmented=False)
    assert plan.shared == {"image_trunk": True, "text": True}, plan.reasons
    trunk_runs, text_runs = _Count(teacher.model.visual.trunk.stem), _Count(teacher.model.token_embedding)
    runner = TeacherRunner(teacher, plan)
    images, tokens = batch()
    full = teacher.encode(images, tokens)
    assert (trunk_runs.n, text_runs.n) == (1, 1)

    with TrunkCapture(student) as capture:
        out = student(images, tokens)
        shared = runner(images, tokens, out, capture.pop())
        assert (trunk_runs.n, text_runs.n) == (1, 1)  # neither recomputed
        for k in full:
            torch.testing.assert_close(shared[k], full[k], rtol=1e-5, atol=1e-6)

        plan.disable("image_trunk")  # the epoch the student unlocks its trunk
        assert not plan.is_shared("image_trunk") and "disabled" in plan.reasons["image_trunk"]
        student(images, tokens)
        again = runner(images, tokens, out, capture.pop())
        assert (trunk_runs.n, text_runs.n) == (2, 1)
        torch.testing.assert_close(again["image_features"], full["image_features"], rtol=1e-5, atol=1e-6)

    # unlocking the text tower without disable(): the plan notices and stops sharing
    student.token_embedding.weight.requires_grad_(True)
    runner(images, tokens, out)
    assert text_runs.n == 2 and not plan.is_shared("text")
    assert "forward_features" not in student.visual.trunk.__dict__  # capture removed


def test_not_shared_when_inputs_or_weights_differ(ckpt):
    student = locked_student(ckpt)
    small = Teacher.from_pretrained(TEACHER_32, str(ckpt))  # same weights, 32px preprocessing
    plan = plan_sharing(student, small, False)
    assert not plan.shared["image_trunk"] and "size" in plan.reasons["image_trunk"]
    assert plan.shared["text"]
    # fed the student's batch as is (upstream's way), the teacher's trunk input is the student's
    assert plan_sharing(student, small, True, teacher_gets_student_batch=True).shared["image_trunk"]

    teacher = Teacher.from_pretrained(TEACHER, str(ckpt))
    plan = plan_sharing(student, teacher, True, same_text_tokens=False)
    assert plan.shared == {"image_trunk": False, "text": False}
    assert "augmented" in plan.reasons["image_trunk"] and "tokenizers" in plan.reasons["text"]

    with torch.no_grad():
        teacher.model.visual.trunk.stages[-1].blocks[0].conv_dw.weight.add_(1e-3)
    student.ln_final.weight.requires_grad_(True)
    plan = plan_sharing(student, teacher, False)
    assert plan.shared == {"image_trunk": False, "text": False}
    assert "different weights" in plan.reasons["image_trunk"] and "trainable" in plan.reasons["text"]
    assert len(plan.lines()) == 2


# ---------------------------------------------------------------------------------------------
# head alignment


def test_reference_head_is_the_pretrained_head(ckpt, teacher):
    student = locked_student(ckpt)
    ref = build_reference_head(student, read_head_state(ckpt))
    assert not any(p.requires_grad for p in ref.parameters())
    images, tokens = batch()
    with TrunkCapture(student) as capture:
        student(images, tokens)
        feats = capture.pop()
    assert capture.pop() is None
    torch.testing.assert_close(ref(feats), teacher.encode_image(images), rtol=1e-5, atol=1e-6)

    # an EMA-style deepcopy captures into its own slot, never the original's
    student.visual.trunk.stem[0].weight.requires_grad_(True)  # captured features carry a graph
    capture = TrunkCapture(student)
    student(images, tokens)
    twin = copy.deepcopy(student)
    twin(images[:1], tokens[:1])
    assert capture.pop().shape[0] == 4 and TrunkCapture(twin).pop().shape[0] == 1


@pytest.mark.parametrize("mode", ["cosine", "kl"])
def test_headalign_pulls_new_head_to_reference(ckpt, mode):
    student = locked_student(ckpt)
    ref = build_reference_head(student, read_head_state(ckpt))
    loss_fn = HeadAlignLoss(weight=1.0, mode=mode)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(p is q for p, q in zip(trainable, student.visual.head.parameters()))
    opt = torch.optim.Adam(trainable, lr=3e-3)
    images, tokens = batch(8)
    losses = []
    with TrunkCapture(student) as capture:
        for _ in range(12):
            out = student(images, tokens)
            terms = loss_fn(out, ref(capture.pop()))
            opt.zero_grad()
            terms["headalign_loss"].backward()
            opt.step()
            losses.append(terms["headalign_loss"].item())
    assert not any(p.grad is not None for p in ref.parameters())
    assert all(p.grad is None for n, p in student.named_parameters() if not n.startswith("visual.head."))
    assert losses[-1] < 0.5 * losses[0], losses


def test_headalign_without_reference_is_a_clear_error(ckpt):
    student = locked_student(ckpt)
    state = torch.load(ckpt)
    with pytest.raises(ValueError, match="no image head") as e:
        build_reference_head(student, {k: v for k, v in state.items() if not k.startswith("visual.head.")})
    assert "\n" not in str(e.value)
    linear_student, _ = create_model(TEACHER, pretrained=str(ckpt))  # the checkpoint head fits: loaded into it
    with pytest.raises(ValueError, match="fits the student's head"):
        build_reference_head(linear_student, state)


def test_sharing_waits_while_student_part_is_stochastic(ckpt, teacher):
    from timm.layers import DropPath

    student = locked_student(ckpt)
    student.visual.trunk.stages[0].blocks[0].drop_path = DropPath(0.5)  # in eval mode: the identity
    plan = plan_sharing(student, teacher, False)
    assert plan.shared["image_trunk"], plan.reasons
    student.train()  # frozen trunk left in train mode: drop-path is live, features are not the teacher's
    assert not plan.active("image_trunk") and plan.is_shared("image_trunk")
    student.eval()
    assert plan.active("image_trunk")


def test_loss_terms_merge_refuses_a_name_given_twice():
    from open_clip_train.losses import merge_terms, total

    contrastive, head = {"contrastive_loss": torch.tensor(1.0)}, {"headalign_loss": torch.tensor(0.25)}
    merged = merge_terms(contrastive, head)
    assert list(merged) == ["contrastive_loss", "headalign_loss"] and float(total(merged)) == 1.25
    with pytest.raises(ValueError, match=r"\['contrastive_loss'\] produced twice"):
        merge_terms(merged, {"contrastive_loss": torch.tensor(5.0)})
