"""TeachCLIP training through the trainer (--dataset-type msrvtt --distill): a teacher cache gives
the live teacher's run, 2 ranks give one process's, and the user errors are one line."""
from pathlib import Path

import pytest
import torch

from open_clip_train.extract_teacher import main as extract
from open_clip_train.main import main
from open_clip_train.models import create_model
from open_clip_train.video.demo import write_demo

from test_ddp import TOL, in_process, torchrun
from launch import DUMP_SCRIPT

MODEL = "tiny-convnext-cliptext"
SGD = ["--opt", "sgd", "--momentum", "0", "--lr", "0.05"]
TERMS = ("Contrastive_loss", "Distill_coarse_loss", "Distill_fine_loss")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vdistill")
    write_demo(tmp / "data", num_train=12, num_test=4, seed=0)
    torch.manual_seed(1)
    teacher, _ = create_model(MODEL)
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    assert extract(["--dataset-type", "msrvtt", "--train-data", str(tmp / "data"), "--max-frames", "2",
                    "--teacher-model", MODEL, "--teacher-pretrained", str(tmp / "teacher.pt"), "--out",
                    str(tmp / "cache"), "--dtype", "float32", "--workers", "0"]) == 0
    return tmp


def args(setup, logs, name, *extra, batch=8):
    return [str(a) for a in (
        "--model", MODEL, "--dataset-type", "msrvtt", "--train-data", setup / "data", "--video-pooling", "afa",
        "--max-frames", 2, "--epochs", 1, "--batch-size", batch, "--train-num-samples", 16, *SGD, "--warmup", 1,
        "--workers", 0, "--precision", "fp32", "--device", "cpu", "--seed", 0, "--log-every-n-steps", 1,
        "--log-dir", logs, "--name", name, "--distill", "--teacher-model", MODEL, *extra)]


def weights(path: Path) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
def test_cache_run_equals_live_run(setup, tmp_path, monkeypatch):
    init = {}
    from open_clip_train import trainer as trainer_module
    build = trainer_module.Trainer.build.__func__

    def build_and_keep(cls, *a, **k):
        t = build(cls, *a, **k)
        init.update({n: p.detach().clone() for n, p in t.model.state_dict().items()})
        return t

    monkeypatch.setattr(trainer_module.Trainer, "build", classmethod(build_and_keep))
    for d in ("cache", "live", "nodistill"):
        (tmp_path / d).mkdir()
    in_process(args(setup, tmp_path / "logs", "cache", "--teacher-cache", setup / "cache"), tmp_path / "cache",
               monkeypatch)
    in_process(args(setup, tmp_path / "logs", "live", "--teacher-pretrained", setup / "teacher.pt"),
               tmp_path / "live", monkeypatch)
    in_process(args(setup, tmp_path / "logs", "nodistill", "--teacher-cache", setup / "cache",
                    "--distill-coarse-weight", 0, "--distill-fine-weight", 0), tmp_path / "nodistill", monkeypatch)
    cached, live = weights(tmp_path / "cache" / "rank0.pt"), weights(tmp_path / "live" / "rank0.pt")
    assert max_diff(init, live) > 100 * TOL  # the runs trained
    assert max_diff(weights(tmp_path / "nodistill" / "rank0.pt"), live) > 100 * TOL  # and the teacher mattered
    assert max_diff(cached, live) < TOL
    for name in ("cache", "live"):
        log = (tmp_path / "logs" / name / "out.log").read_text()
        steps = [line for line in log.splitlines() if "Train Epoch:" in line]
        assert len(steps) == 2 and all(t in s for s in steps for t in TERMS)
    assert "video teacher: 1 cache(s)" in (tmp_path / "logs" / "cache" / "out.log").read_text()
    assert "live (frozen" in (tmp_path / "logs" / "live" / "out.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["cache", "live"])
def test_two_ranks_equal_one_process(setup, tmp_path, teacher):
    script = tmp_path / "dump_main.py"
    script.write_text(DUMP_SCRIPT)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    cache = ["--teacher-cache", setup / "cache"] if teacher == "cache" else ["--teacher-pretrained", setup / "teacher.pt"]
    torchrun(2, script, args(setup, tmp_path / "logs", "two", *cache, batch=4), tmp_path / "two")
    with pytest.MonkeyPatch.context() as mp:
        in_process(args(setup, tmp_path / "logs", "one", *cache, batch=8), tmp_path / "one", mp)
    two0, two1 = weights(tmp_path / "two" / "rank0.pt"), weights(tmp_path / "two" / "rank1.pt")
    one = weights(tmp_path / "one" / "rank0.pt")
    assert all(torch.equal(two0[k], two1[k]) for k in two0)
    assert max_diff(two0, one) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["cache", "live"])
def test_accumulated_micro_batches_equal_the_whole_batch(setup, tmp_path, monkeypatch, teacher):
    """--batch-size 4 --accum-freq 2 == --batch-size 8 (plain SGD): the coarse term's [B, B] targets,
    the fine term's frame scores and the contrastive loss all see the whole accumulated batch."""
    source = ["--teacher-cache", setup / "cache"] if teacher == "cache" else ["--teacher-pretrained", setup / "teacher.pt"]
    for d in ("whole", "accum", "small"):
        (tmp_path / d).mkdir()
    in_process(args(setup, tmp_path / "logs", "whole", *source, batch=8), tmp_path / "whole", monkeypatch)
    in_process(args(setup, tmp_path / "logs", "accum", *source, "--accum-freq", 2, batch=4), tmp_path / "accum",
               monkeypatch)
    # not vacuous: batch 4 without accumulation (4 steps over other batches) ends elsewhere
    in_process(args(setup, tmp_path / "logs", "small", *source, "--train-num-samples", 8, batch=4),
               tmp_path / "small", monkeypatch)
    whole, accum = weights(tmp_path / "whole" / "rank0.pt"), weights(tmp_path / "accum" / "rank0.pt")
    assert max_diff(accum, whole) < TOL
    assert max_diff(weights(tmp_path / "small" / "rank0.pt"), whole) > 100 * TOL
    log = (tmp_path / "logs" / "accum" / "out.log").read_text()
    steps = [line for line in log.splitlines() if "Train Epoch:" in line]
    assert len(steps) == 2 and all(t in x for x in steps for t in TERMS)


@pytest.mark.slow
def test_two_ranks_with_accumulation_equal_one_process(setup, tmp_path):
    """2 ranks x 2 x --accum-freq 2 == 1 process x 8 (cached teacher): each rank concatenates its
    micro-batches' teacher rows as it does the student's outputs, then both are gathered alike, so
    the coarse targets stay aligned with the student's logits."""
    script = tmp_path / "dump_main.py"
    script.write_text(DUMP_SCRIPT)
    for d in ("two", "one"):
        (tmp_path / d).mkdir()
    cache = ["--teacher-cache", setup / "cache"]
    torchrun(2, script, args(setup, tmp_path / "logs", "two", *cache, "--accum-freq", 2, batch=2), tmp_path / "two")
    with pytest.MonkeyPatch.context() as mp:
        in_process(args(setup, tmp_path / "logs", "one", *cache, batch=8), tmp_path / "one", mp)
    two0, two1 = weights(tmp_path / "two" / "rank0.pt"), weights(tmp_path / "two" / "rank1.pt")
    assert all(torch.equal(two0[k], two1[k]) for k in two0)
    assert max_diff(two0, weights(tmp_path / "one" / "rank0.pt")) < TOL


def test_without_afa_the_fine_term_is_off(setup, tmp_path, monkeypatch):
    in_process(args(setup, tmp_path / "logs", "mean", "--teacher-cache", setup / "cache", "--video-pooling", "mean",
                    "--train-num-samples", 8, "--distill-coarse", "ce"), tmp_path, monkeypatch)
    log = (tmp_path / "logs" / "mean" / "out.log").read_text()
    assert "the fine term is off (--video-pooling mean has no AFA" in log
    assert "coarse ce x 10.0" in log
    steps = [line for line in log.splitlines() if "Train Epoch:" in line]
    assert steps and all("Distill_coarse_loss" in s and "Distill_fine_loss" not in s for s in steps)


@pytest.mark.parametrize("extra, message", [
    (("--max-frames", "3"), "frames.max_frames is 2 in the cache but 3 for this run"),
    (("--max-words", "20"), "text.max_words is 32 in the cache but 20 for this run"),
    (("--msrvtt-train-split", "EXTRA"), "1 of 2 videos (ids video13) and 5 of 10 captions"),
    (("--teacher-model", "ViT-B-32"), "teacher.model is 'tiny-convnext-cliptext' in the cache but 'ViT-B-32'"),
    (("--teacher-cache", "NOWHERE"), "--teacher-cache NOWHERE: no such directory"),
    (("--distill-fine", "kl"), "invalid choice"),
])
def test_cache_errors_are_one_line_and_exit_2(setup, tmp_path, capfd, extra, message):
    (tmp_path / "extra.csv").write_text("video_id\nvideo0\nvideo13\n")
    subst = {"EXTRA": str(tmp_path / "extra.csv"), "NOWHERE": "NOWHERE"}
    argv = args(setup, tmp_path / "logs", "bad", "--teacher-cache", setup / "cache", *[subst.get(x, x) for x in extra])
    assert main(argv) == 2
    err = [line for line in capfd.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert not any(tmp_path.glob("logs/*/out.log"))


def test_video_distill_flags_need_msrvtt_distill(tmp_path, capfd):
    assert main(["--model", MODEL, "--train-data", "x.json", "--distill-coarse", "ce", "--log-dir", str(tmp_path)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--distill-coarse is a video distillation flag" in err[0]
