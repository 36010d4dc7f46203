"""Video-text training through the trainer (--dataset-type msrvtt): end to end with the msrvtt_*
results keys and bad videos, locked towers, DDP == one process, mid-epoch resume, --dry-run and
the flags' user errors."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from open_clip_train import trainer as trainer_module
from open_clip_train.main import main
from open_clip_train.video.demo import write_demo
from open_clip_train.video.metrics import RECALL_KS

from test_ddp import SGD, TOL, in_process, torchrun
from launch import DUMP_SCRIPT

MODEL = "tiny-convnext-cliptext"
KEYS = [f"msrvtt_{d}_{m}" for d in ("t2v", "v2t") for m in [f"R@{k}" for k in RECALL_KS] + ["median_rank", "mean_rank"]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("msrvtt")
    write_demo(out, num_train=16, num_test=6, seed=0)
    return out


def args(root, logs, name, *extra, val=True):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "msrvtt", "--train-data", root, *(("--val-data", root) if val else ()),
        "--video-pooling", "afa", "--max-frames", 2, "--epochs", 1, "--batch-size", 8, "--train-num-samples", 32,
        *SGD, "--warmup", 1, "--workers", 0, "--precision", "fp32", "--device", "cpu", "--seed", 0,
        "--log-every-n-steps", 1, "--log-dir", logs, "--name", name, *extra)]


def params_of(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def results(run: Path):
    return [json.loads(x) for x in (run / "checkpoints" / "results.jsonl").read_text().splitlines() if x.strip()]


def run_with_bad_videos(root, tmp_path):
    """A run with a broken training video and a missing test video; checks its outputs."""
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "videos" / "video0.mp4").write_bytes(b"")  # a training video: substituted, counted
    (data / "videos" / "video16.mp4").unlink()  # a test video: left out of the metrics, counted
    assert main(args(data, tmp_path / "logs", "e2e", "--val-at-start", "--max-bad-samples-fraction", "0.5",
                     "--train-num-samples", 80, "--batch-size", 16)) == 0
    rows = results(tmp_path / "logs" / "e2e")
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert set(KEYS) <= set(r) and not any(k.startswith("coco_") for k in r)
        assert r["msrvtt_num_videos"] == 5 and r["msrvtt_num_captions"] == 5 and r["num_bad_videos"] == 1
        assert 0 <= r["msrvtt_t2v_R@1"] <= r["msrvtt_t2v_R@5"] <= r["msrvtt_t2v_R@10"] <= 1
    log = (tmp_path / "logs" / "e2e" / "out.log").read_text()
    train_bad = re.search(r"data, epoch 0: (\d+) bad samples? of 80 .*empty file.*video0\.mp4", log)
    assert train_bad and int(train_bad.group(1)) >= 1  # every caption of video0 that was drawn
    assert re.search(r"Eval Epoch: 0 left out 1 bad sample of 6 .*video16\.mp4", log)
    assert re.search(r"trainable params \(INIT\): visual=\d+, text=\d+, video=\d+, total=\d+", log)
    return tmp_path / "logs" / "e2e", rows


@pytest.fixture(scope="module")
def e2e(root, tmp_path_factory):
    return run_with_bad_videos(root, tmp_path_factory.mktemp("e2e"))


@pytest.mark.slow
def test_run_writes_msrvtt_keys_and_counts_bad_videos(e2e):
    assert e2e[1]  # the checks are in run_with_bad_videos


@pytest.mark.slow
def test_compare_tabulates_video_runs(e2e, capsys):
    from open_clip_train.compare.cli import main as compare

    run, rows = e2e
    assert compare([str(run)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("## MSR-VTT"):]
    assert "| run | last epoch | V2T R@1/5/10 | T2V R@1/5/10 |" in table
    last = rows[-1]
    v2t = "/".join(f"{100 * last[f'msrvtt_v2t_R@{k}']:.2f}%" for k in RECALL_KS)
    t2v = "/".join(f"{100 * last[f'msrvtt_t2v_R@{k}']:.2f}%" for k in RECALL_KS)
    assert f"| e2e | 1 | {v2t} | {t2v} |" in table
    assert "n/a: video run, see the MSR-VTT table" in out


@pytest.mark.slow
def test_locked_towers_train_only_video_modules_heads_and_logit_scale(root, tmp_path, monkeypatch):
    init = {}
    build = trainer_module.Trainer.build.__func__

    def build_and_keep(cls, *a, **k):
        t = build(cls, *a, **k)
        init.update({n: p.detach().clone() for n, p in t.model.named_parameters()})
        return t

    monkeypatch.setattr(trainer_module.Trainer, "build", classmethod(build_and_keep))
    in_process(args(root, tmp_path / "logs", "locked", "--lock-image", "--lock-text", "--train-num-samples", 8,
                    val=False), tmp_path, monkeypatch)
    final = params_of(tmp_path / "rank0.pt")
    changed = {n for n in init if not torch.equal(init[n], final[n])}
    expected = {n for n in init if n.startswith(("video_pool.", "visual.head.")) or n == "logit_scale"}
    assert any(n.startswith("video_pool.") for n in expected)
    assert changed == expected


@pytest.mark.slow
def test_two_ranks_equal_one_process(root, tmp_path):
    script = tmp_path / "dump_main.py"
    script.write_text(DUMP_SCRIPT)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    common = ["--lock-image", "--local-loss", "--gather-with-grad"]
    torchrun(2, script, args(root, tmp_path / "logs", "two", *common, "--batch-size", 4), tmp_path / "two")
    with pytest.MonkeyPatch.context() as mp:
        in_process(args(root, tmp_path / "logs", "one", *common, "--batch-size", 8), tmp_path / "one", mp)
    two0, two1 = params_of(tmp_path / "two" / "rank0.pt"), params_of(tmp_path / "two" / "rank1.pt")
    one = params_of(tmp_path / "one" / "rank0.pt")
    assert all(torch.equal(two0[k], two1[k]) for k in two0)
    assert max((two0[k].float() - one[k].float()).abs().max().item() for k in one) < TOL
    r_two, r_one = results(tmp_path / "logs" / "two")[-1], results(tmp_path / "logs" / "one")[-1]
    for k in KEYS:  # the evaluation is shared across the ranks and ends with the same numbers
        assert r_two[k] == pytest.approx(r_one[k], abs=1e-9)


class Crash(Exception):
    pass


@pytest.mark.slow
def test_mid_epoch_resume_equals_uninterrupted(root, tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    extra = ("--save-every-n-steps", 2, "--lock-image", "--lock-text")
    assert main(args(root, logs, "full", *extra, val=False)) == 0
    boundary = trainer_module.Trainer._step_boundary

    def crash_after_step_2(self, epoch, steps_done):
        stopped = boundary(self, epoch, steps_done)
        if self.step == 2:
            raise Crash()
        return stopped

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_step_boundary", crash_after_step_2)
        with pytest.raises(Crash):
            main(args(root, logs, "cut", *extra, val=False))
    assert main(args(root, logs, "cut", *extra, "--resume", "latest", val=False)) == 0
    assert "steps into epoch 0" in (logs / "cut" / "out.log").read_text()
    full, cut = params_of(logs / "full" / "checkpoints" / "epoch_1.pt"), params_of(logs / "cut" / "checkpoints" / "epoch_1.pt")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)


def test_dry_run_lists_the_video_modules_with_counts(root, capsys):
    from open_clip_train.models import create_model
    from open_clip_train.video import VideoModelCfg, attach_video

    assert main(["--model", MODEL, "--dataset-type", "msrvtt", "--train-data", str(root), "--video-pooling",
                 "seqtransf-afa", "--max-frames", "4", "--lock-image", "--lock-text", "--dry-run"]) == 0
    out = capsys.readouterr().out
    model, _ = create_model(MODEL, device="meta")
    attach_video(model, VideoModelCfg("seqtransf-afa", 4))
    for part in ("temporal", "afa"):
        n = sum(p.numel() for p in getattr(model.video_pool, part).parameters())
        assert f"video: video_pool.{part} {n:,} params, trainable" in out
    video = sum(p.numel() for n, p in model.named_parameters() if n.startswith("video_pool."))
    assert re.search(rf"trainable params \(INIT\): visual=\d+, text=0, video={video}, total=", out)


@pytest.mark.parametrize("extra,message", [
    (("--video-pooling", "bogus"), "--video-pooling"),
    (("--train-data", "MISSING"), "MSRVTT_data.json"),
    (("--msrvtt-train-split", "7k", "--train-data", "NO7K"), "MSRVTT_train.7k.csv"),
    (("--frames-root", "NOSTORE"), "not a frame store"),
])
def test_flag_errors_are_one_line_and_exit_2(root, tmp_path, capfd, extra, message):
    bare = tmp_path / "bare"
    bare.mkdir()
    no7k = tmp_path / "no7k"
    shutil.copytree(root, no7k, ignore=shutil.ignore_patterns("videos"))
    (no7k / "MSRVTT_train.7k.csv").unlink()
    subst = {"MISSING": str(bare), "NO7K": str(no7k), "NOSTORE": str(bare)}
    argv = ["--model", MODEL, "--dataset-type", "msrvtt", "--train-data", str(root), "--log-dir", str(tmp_path)]
    argv += [subst.get(x, x) for x in extra]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not any(tmp_path.glob("*/out.log"))


def test_video_flag_without_msrvtt_is_refused(capfd, tmp_path):
    assert main(["--model", MODEL, "--train-data", "x.json", "--video-pooling", "afa", "--log-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --dataset-type msrvtt" in err[0]
