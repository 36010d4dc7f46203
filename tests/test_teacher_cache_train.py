"""Training from a teacher cache (--teacher-cache) through main([...]) on tiny models: the same
run as with the live teacher, pre-flight errors (manifest mismatch, missing ids), the
augmentation warning, and two gloo ranks that each read only their rows."""
import json
import re
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch

import open_clip_train.models
from open_clip_train.distill import teacher as teacher_module
from open_clip_train.data import load_captioned
from open_clip_train.demo_data import generate
from open_clip_train.distill.extract import main as extract, run_shard, samples_of
from open_clip_train.main import main
from open_clip_train.models import create_model
from open_clip_train.distill.teacher import Teacher
from open_clip_train.distill.cache import manifest_meta, write_manifest

STUDENT = "tiny-convnext-cliptext"
TEACHER = "tiny-convnext-cliptext-linear"
TERMS = ("Contrastive_loss", "Distill_loss")


def _save_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model, _ = create_model(TEACHER)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path


def _extract(ckpt: Path, ann: Path, out: Path, model: str = TEACHER, *extra: str) -> Path:
    rc = extract(["--teacher-model", model, "--teacher-pretrained", str(ckpt), "--train-data", str(ann),
                  "--out", str(out), "--batch-size", "5", "--workers", "0", "--precision", "fp32", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcache")
    demo = generate(root / "coco", num_train=24, num_val=4, image_size=32, seed=3)
    ckpt = _save_teacher(root / "teacher.pt", 0)
    cache = _extract(ckpt, demo.train_annotations, root / "cache")
    return root, demo, ckpt, cache


def _argv(root: Path, demo, ckpt: Path, name: str, *extra) -> list:
    return [
        "--model", STUDENT, "--pretrained", ckpt, "--dataset-type", "coco", "--train-data", demo.train_annotations,
        "--coco-caption-sampling", "random", "--epochs", "2", "--batch-size", "6", "--lr", "1e-3", "--warmup", "2",
        "--workers", "0", "--precision", "fp32", "--log-every-n-steps", "1", "--lock-image", "--lock-text",
        "--distill", "--teacher-model", TEACHER, "--distill-weight", "0.5",
        "--log-dir", root / "logs", "--name", name, *extra,
    ]


def _run(root, demo, ckpt, name, *extra) -> str:
    assert main([str(a) for a in _argv(root, demo, ckpt, name, *extra)]) == 0
    return (root / "logs" / name / "out.log").read_text()


def _terms(log: str):
    return {t: [float(x) for x in re.findall(rf"{t}: ([0-9.]+)", log)] for t in TERMS}


def _weights(root: Path, name: str) -> dict:
    return torch.load(root / "logs" / name / "checkpoints" / "epoch_2.pt", map_location="cpu",
                      weights_only=False)["state_dict"]


# Plain SGD: the cached and the live teacher's features differ by float32 rounding (other batch
# sizes, other kernels), and SGD keeps the resulting weight differences rounding-sized, where
# Adam would turn rounding in a near-zero gradient into an lr-sized step.
SGD = ("--opt", "sgd", "--momentum", "0", "--lr", "0.1")


@pytest.mark.parametrize("accum", [1, 2])
def test_cache_trains_like_the_live_teacher(setup, accum, monkeypatch):
    root, demo, ckpt, cache = setup
    live = _run(root, demo, ckpt, f"live{accum}", "--teacher-pretrained", ckpt, "--no-augment",
                "--accum-freq", accum, *SGD)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher model was built although the cache replaces it")

    monkeypatch.setattr(Teacher, "from_pretrained", no_teacher)
    cached = _run(root, demo, ckpt, f"cached{accum}", "--teacher-cache", cache, "--no-augment",
                  "--accum-freq", accum, *SGD)
    assert "teacher cache" in cached and "teacher image_trunk:" not in cached
    assert "un-augmented" not in cached  # --no-augment: the student sees the teacher's view
    a, b = _terms(live), _terms(cached)
    assert len(a["Distill_loss"]) == 2 * 24 // (6 * accum) and a["Distill_loss"][0] > 0
    for t in TERMS:
        assert b[t] == pytest.approx(a[t], rel=2e-4), t
    wa, wb = _weights(root, f"live{accum}"), _weights(root, f"cached{accum}")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)  # the trainer's init seed: the new head as it started
    start = create_model(STUDENT)[0].state_dict()["visual.head.pool.proj.weight"]
    assert (wa["visual.head.pool.proj.weight"] - start).abs().max() > 1e-4  # the head trained


def test_augmentation_warning_in_out_log(setup):
    root, demo, ckpt, cache = setup
    log = _run(root, demo, ckpt, "augmented", "--teacher-cache", cache, "--epochs", "1", "--train-num-samples", "12")
    line = next(l for l in log.splitlines() if "un-augmented" in l)
    assert "WARNING" in line and "teacher cache" in line
    assert _terms(log)["Distill_loss"]


def _one_error_line(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_manifest_mismatch_is_one_line_exit_2(setup, tmp_path, capsys):
    root, demo, ckpt, cache = setup
    other_weights = _save_teacher(tmp_path / "other.pt", 1)
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "bad_w", "--teacher-cache", cache,
                                        "--teacher-pretrained", other_weights))
    assert "teacher.weights_sha256" in err and "extract_teacher" in err

    other = generate(tmp_path / "other", num_train=24, num_val=2, image_size=32, seed=4)
    err = _one_error_line(capsys, _argv(root, other, ckpt, "bad_data", "--teacher-cache", cache))
    assert "dataset.annotations_sha256" in err

    # the teacher config changed between extraction (32 px) and training (64 px)
    cfg = json.loads((Path(open_clip_train.models.__file__).parent / f"model_configs/{TEACHER}.json").read_text())
    for size in (32, 64):
        d = tmp_path / f"cfg{size}"
        d.mkdir()
        cfg["vision_cfg"]["image_size"] = size
        (d / "cachetest-teacher.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(d)
        if size == 32:
            cache32 = _extract(ckpt, demo.train_annotations, tmp_path / "cache32", "cachetest-teacher")
    argv = _argv(root, demo, ckpt, "bad_size", "--teacher-cache", cache32)
    argv[argv.index(TEACHER)] = "cachetest-teacher"
    err = _one_error_line(capsys, argv)
    assert "preprocess.size is [32, 32] in the cache but [64, 64]" in err
    assert not (root / "logs" / "bad_w").exists()  # refused before the run directory


def test_missing_ids_are_counted(setup, tmp_path, capsys):
    """A cache without two of the training images (and their captions), e.g. a lost shard."""
    root, demo, ckpt, _ = setup
    teacher = Teacher.from_pretrained(TEACHER, str(ckpt))
    full = load_captioned("coco", str(demo.train_annotations))
    keep = len(full.images) - 2
    partial = type(full)(full.images[:keep], full.captions[:keep], full.image_ids[:keep], full.caption_ids[:keep])
    run_shard(teacher, samples_of(partial), tmp_path, batch_size=8)
    write_manifest(tmp_path, manifest_meta(
        teacher_model=TEACHER, weights_path=str(ckpt), logit_scale=float(teacher.logit_scale()), precision="fp32",
        annotations=demo.train_annotations, image_root=demo.train_images, preprocess_cfg=teacher.preprocess_cfg),
        world_size=1)
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "missing", "--teacher-cache", tmp_path))
    n_caps = len(full.captions[-1]) + len(full.captions[-2])
    assert f"2 of 24 images (ids {full.image_ids[-2]}, {full.image_ids[-1]})" in err
    assert f"{n_caps} of 120 captions" in err and "not in the cache" in err


def test_cache_flag_errors(setup, capsys):
    root, demo, ckpt, cache = setup
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "err_share", "--teacher-cache", cache, "--no-teacher-share"))
    assert "--no-teacher-share" in err
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "nodir", "--teacher-cache", root / "nope"))
    assert "--teacher-cache" in err and "no such file" in err
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "notcache", "--teacher-cache", root / "coco"))
    assert "no manifest.json" in err


def test_no_teacher_share_runs_the_whole_teacher(setup):
    root, demo, ckpt, _ = setup
    log = _run(root, demo, ckpt, "noshare", "--teacher-pretrained", ckpt, "--no-augment", "--no-teacher-share",
               "--epochs", "1", "--train-num-samples", "12")
    assert "teacher image_trunk: computed (sharing switched off (--no-teacher-share))" in log
    assert "teacher text: computed" in log
    shared = _run(root, demo, ckpt, "share", "--teacher-pretrained", ckpt, "--no-augment",
                  "--epochs", "1", "--train-num-samples", "12")
    assert "teacher image_trunk: shared with the student" in shared
    for t in TERMS:  # same numbers, only the work differs
        assert _terms(log)[t] == pytest.approx(_terms(shared)[t], rel=2e-4)


RANK_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    from open_clip_train import trainer
    from open_clip_train.distill.cache import CachedTeacher
    from open_clip_train.main import main

    read = []
    _call = CachedTeacher.__call__

    def call(self, *a, ids=None, **k):  # which (image id, caption id) rows this rank looked up
        read.extend(map(tuple, ids.tolist()))
        return _call(self, *a, ids=ids, **k)

    _close = trainer.Trainer.close

    def close(self):
        out = os.environ["DUMP_DIR"]
        torch.save(self.model.state_dict(), os.path.join(out, f"rank{self.world.rank}.pt"))
        with open(os.path.join(out, f"ids{self.world.rank}.json"), "w") as f:
            json.dump(read, f)
        _close(self)

    CachedTeacher.__call__ = call
    trainer.Trainer.close = close
    sys.exit(main())
''')


@pytest.mark.slow
def test_two_ranks_with_cache(setup, tmp_path):
    from launch import torchrun

    root, demo, ckpt, cache = setup
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    argv = _argv(root, demo, ckpt, "ddp", "--teacher-cache", cache, "--no-augment", "--batch-size", "4",
                 "--local-loss", "--gather-with-grad", "--epochs", "1")
    torchrun(2, script, argv, tmp_path)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(w0) == set(w1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ids = [set(map(tuple, json.loads((tmp_path / f"ids{r}.json").read_text()))) for r in range(2)]
    steps = 24 // (4 * 2)  # one caption per image per epoch, global batch 8
    assert len(ids[0]) == len(ids[1]) == steps * 4
    assert not ids[0] & ids[1]  # each rank read only its own rows
    pairs = set(map(tuple, load_captioned("coco", str(demo.train_annotations)).pair_ids().tolist()))
    assert ids[0] | ids[1] <= pairs and len({i for i, _ in ids[0] | ids[1]}) == 24
    log = (root / "logs" / "ddp" / "out.log").read_text()
    assert "Distill_loss" in log


def test_cache_of_other_images_under_the_same_ids_is_refused(setup, tmp_path, capsys):
    """The manifest records the image root: the same annotation file over a copy of the images
    elsewhere (--train-image-root) is another data set as far as the cache can tell."""
    import shutil
    root, demo, ckpt, cache = setup
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["dataset"]["image_root"] == str(Path(demo.root / "train2017").resolve())
    copy = shutil.copytree(demo.root / "train2017", tmp_path / "elsewhere")
    err = _one_error_line(capsys, _argv(root, demo, ckpt, "other_root", "--teacher-cache", cache,
                                        "--train-image-root", copy))
    assert "dataset.image_root" in err and "extract_teacher" in err
