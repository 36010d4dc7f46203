"""More video training through the trainer (--dataset-type msrvtt), tiny data: --accum-freq on
video batches equals the whole batch, a zero-shot baseline (--val-at-start --epochs 0), an unlock
schedule on video data, --grad-checkpointing on the per-frame pass, and the full-split metrics'
memory (no model)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from open_clip_train import trainer as trainer_module
from open_clip_train.main import main
from open_clip_train.video.demo import write_demo
from open_clip_train.video.metrics import video_ranks

MODEL = "tiny-convnext-cliptext"
KEYS = [f"msrvtt_{d}_{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")]
SGD = ["--opt", "sgd", "--momentum", "0", "--lr", "0.2", "--warmup", "1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("msrvtt_more")
    write_demo(out, num_train=16, num_test=6, seed=0)
    return out


def args(root, logs, name, *extra, val=False):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "msrvtt", "--train-data", root, *(("--val-data", root) if val else ()),
        "--video-pooling", "afa", "--max-frames", 2, "--epochs", 1, "--batch-size", 8, "--train-num-samples", 16,
        *SGD, "--workers", 0, "--precision", "fp32", "--device", "cpu", "--seed", 0,
        "--log-every-n-steps", 1, "--log-dir", logs, "--name", name, *extra)]


def final(logs: Path, name: str, epoch: int = 1) -> dict:
    path = logs / name / "checkpoints" / f"epoch_{epoch}.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def worst_difference(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}


def keep_model(monkeypatch, on_build):
    """Calls on_build(trainer) right after Trainer.build (the initial weights, hooks)."""
    build = trainer_module.Trainer.build.__func__

    def build_and_keep(cls, *a, **k):
        t = build(cls, *a, **k)
        on_build(t)
        return t

    monkeypatch.setattr(trainer_module.Trainer, "build", classmethod(build_and_keep))


# ------------------------------------------------------------------------------- (a) accumulation


@pytest.mark.slow
def test_accumulated_video_batches_equal_the_whole_batch(root, tmp_path, monkeypatch):
    """Plain SGD: batch 8 x --accum-freq 2 ends with the weights of batch 16 (image tower unlocked,
    grad clipping on). Upstream's accumulation adds logit_scale's gradient once per micro-batch:
    off by lr x that gradient, far above the tolerance."""
    init = {}
    keep_model(monkeypatch, lambda t: init.update({k: v.detach().clone() for k, v in t.model.state_dict().items()}))
    common = ("--lock-text", "--train-num-samples", 32, "--grad-clip-norm", 1.0)
    assert main(args(root, tmp_path, "whole", *common, "--batch-size", 16)) == 0
    assert main(args(root, tmp_path, "accum", *common, "--batch-size", 8, "--accum-freq", 2)) == 0
    whole, accum = final(tmp_path, "whole"), final(tmp_path, "accum")
    worst = worst_difference(accum, whole)
    assert max(worst.values()) < 2e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    rows = [json.loads(x) for x in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples"] == 16 * r["step"] for r in rows)
    # not vacuous: 2 steps moved the scale, the video modules and the image trunk far beyond the tolerance
    moved = {k for k, v in whole.items() if (v.double() - init[k].double()).abs().max() > 1e-3}
    assert "logit_scale" in moved
    assert any(k.startswith("video_pool.") for k in moved) and any(k.startswith("visual.trunk.") for k in moved)


# ------------------------------------------------------------------------------- (b) zero-shot baseline


@pytest.mark.slow
def test_zero_shot_baseline_evaluates_once_and_trains_nothing(root, tmp_path, monkeypatch):
    init = {}
    keep_model(monkeypatch, lambda t: init.update({k: v.detach().clone() for k, v in t.model.state_dict().items()}))

    def no_step(self, batches):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", no_step)
    assert main(args(root, tmp_path, "zs", "--val-at-start", "--epochs", 0, val=True)) == 0
    run = tmp_path / "zs"
    rows = [json.loads(x) for x in (run / "checkpoints" / "results.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert set(KEYS) <= set(rows[0]) and rows[0]["msrvtt_num_videos"] == 6
    assert 0 <= rows[0]["msrvtt_t2v_R@1"] <= rows[0]["msrvtt_t2v_R@10"] <= 1
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or not [x for x in metrics.read_text().splitlines() if '"samples_per_second"' in x]
    saved = list((run / "checkpoints").glob("*.pt"))
    for path in saved:  # whatever is saved holds the initial weights
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.equal(sd[k], init[k]) for k in init)


# ------------------------------------------------------------------------------- (c) unlock schedule


@pytest.mark.slow
def test_unlock_schedule_on_video_data(root, tmp_path, monkeypatch):
    init = {}
    keep_model(monkeypatch, lambda t: init.update({k: v.detach().clone() for k, v in t.model.state_dict().items()}))
    assert main(args(root, tmp_path, "unlock", "--lock-image", "--lock-text", "--unfreeze-image-at-epoch", 1,
                     "--epochs", 2)) == 0
    log = (tmp_path / "unlock" / "out.log").read_text()
    assert re.search(r"unlock at epoch 1: image \(\d+ tensors\)", log)
    assert not re.search(r"unlock at epoch 0", log)
    e1, e2 = final(tmp_path, "unlock", 1), final(tmp_path, "unlock", 2)
    trunk = [k for k in init if k.startswith("visual.trunk.") and k.endswith("weight")]
    assert trunk and all(torch.equal(e1[k], init[k]) for k in trunk)  # locked through epoch 0
    moved = [k for k in trunk if (e2[k] - e1[k]).abs().max() > 1e-4]
    assert len(moved) > len(trunk) // 2  # unlocked in epoch 1
    assert any(not torch.equal(e1[k], init[k]) for k in init if k.startswith("video_pool."))  # epoch 0 trained
    assert all(torch.equal(e2[k], init[k]) for k in init if k.startswith("text."))  # text stays locked


# ------------------------------------------------------------------------------- (d) grad checkpointing


def run_counting(root, logs, name, monkeypatch, *extra) -> tuple[dict, list]:
    """One step with the image tower unlocked; counts calls of the trunk's first block (a pre-hook:
    checkpointing's recomputation stops early, before a forward hook would run)."""
    calls = []

    def hook(t):
        t.model.visual.trunk.stages[0].blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))

    with monkeypatch.context() as mp:
        keep_model(mp, hook)
        assert main(args(root, logs, name, "--lock-text", "--batch-size", 8, "--train-num-samples", 8, *extra)) == 0
    return final(logs, name), calls


@pytest.mark.slow
def test_grad_checkpointing_same_step_and_recomputes(root, tmp_path, monkeypatch):
    plain, plain_calls = run_counting(root, tmp_path, "plain", monkeypatch)
    ckpt, ckpt_calls = run_counting(root, tmp_path, "gc", monkeypatch, "--grad-checkpointing")
    # checkpointing recomputes the block in the backward pass: twice the forward calls
    assert len(plain_calls) >= 1 and len(ckpt_calls) == 2 * len(plain_calls)
    worst = worst_difference(ckpt, plain)
    assert max(worst.values()) < 1e-6, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    log = (tmp_path / "gc" / "out.log").read_text()
    assert "Traceback" not in log


# ------------------------------------------------------------------------------- metrics memory


def dense_ranks(vid: torch.Tensor, txt: torch.Tensor, t2v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definitions in video/metrics.py on the full score matrix (ties count against the query)."""
    s = txt @ vid.T  # [C, V]
    own = s.gather(1, t2v[:, None])
    other = torch.arange(vid.shape[0])[None, :] != t2v[:, None]
    t2v_ranks = 1 + ((s >= own) & other).sum(1)
    best = torch.full((vid.shape[0],), float("-inf"), dtype=s.dtype).scatter_reduce(0, t2v, own[:, 0], "amax")
    v2t_ranks = 1 + ((s.T >= best[:, None]) & (t2v[None, :] != torch.arange(vid.shape[0])[:, None])).sum(1)
    return t2v_ranks, v2t_ranks


def test_chunked_ranks_equal_the_dense_computation():
    torch.manual_seed(0)
    videos, per_video = 37, 5
    vid = torch.nn.functional.normalize(torch.randn(videos, 8, dtype=torch.float64), dim=-1)
    t2v = torch.randint(0, videos, (videos * per_video,))
    t2v[:videos] = torch.arange(videos)  # every video has a caption
    txt = torch.nn.functional.normalize(vid[t2v] + torch.randn(len(t2v), 8, dtype=torch.float64), dim=-1)
    txt[5] = vid[t2v[5]]  # exact ties, resolved against the query
    vid[3] = vid[4]
    want_t2v, want_v2t = dense_ranks(vid, txt, t2v)
    assert (want_t2v > 1).any() and (want_v2t > 1).any()
    for chunk in (1, 7, 64, 4096):
        got_t2v, got_v2t = video_ranks(vid, txt, t2v, chunk_size=chunk)
        assert torch.equal(got_t2v, want_t2v) and torch.equal(got_v2t, want_v2t), chunk


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc high-water-mark reset")
def test_full_split_metrics_never_form_the_score_matrix():
    """2,990 videos x 59,800 captions (MSR-VTT full), dim 64, in a fresh process: peak RSS during the
    metrics rises by far less than the dense float32 score matrix (682 MiB)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_video_train import eval_memory

    r = eval_memory(videos=2990, per_video=20, dim=64, chunk=1024)
    # chunked: the features (15 MiB) + a few chunk x chunk blocks (4 MiB each); measured 40 MiB
    assert r["rise_mib"] < r["dense_mib"] / 4, r
    assert 0 < r["t2v_R@1"] <= 1 and 0 < r["v2t_R@1"] <= 1
