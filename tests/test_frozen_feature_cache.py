"""--frozen-feature-cache through main([...]) on a tiny model: a cached run trains to the weights of
the live run, a second run reuses the cache without recomputing or decoding images, a manifest
mismatch is one error line, resume continues on the cache, an unlock switches a tower back to
live computation, and 2 ranks compute their shards and train like one process."""
import json
import math
import re

import numpy as np
import pytest
import torch

from open_clip_train import frozen_features
from open_clip_train.demo_data import generate
from open_clip_train.main import main

pytestmark = pytest.mark.slow  # end-to-end runs through main()

MODEL = "tiny-convnext-cliptext"
# Plain SGD: cached and live frozen outputs differ by float32 rounding (other batch compositions),
# and SGD keeps the weight differences rounding-sized, where Adam would amplify them.
SGD = ("--opt", "sgd", "--momentum", "0", "--lr", "0.1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffc")
    return root, generate(root / "coco", num_train=24, num_val=4, image_size=32, seed=3)


def _argv(root, demo, name, *extra):
    return [str(a) for a in [
        "--model", MODEL, "--dataset-type", "coco", "--train-data", demo.train_annotations, "--epochs", "2",
        "--batch-size", "6", "--warmup", "1", "--workers", "0", "--precision", "fp32", "--log-every-n-steps", "1",
        "--no-augment", "--log-dir", root / "logs", "--name", name, *SGD, *extra]]


def _run(root, demo, name, *extra) -> str:
    assert main(_argv(root, demo, name, *extra)) == 0
    return (root / "logs" / name / "out.log").read_text()


def _weights(root, name, epoch=2):
    return torch.load(root / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu",
                      weights_only=False)["state_dict"]


def _same_weights(a, b):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _moved(a, b, key):
    return (a[key] - b[key]).abs().max() > 1e-4


def test_cached_equals_live_and_is_reused(demo, monkeypatch):
    root, d = demo
    cache = root / "cache_both"
    live = _run(root, d, "live", "--lock-image", "--lock-text")
    assert "--frozen-feature-cache DIR would compute" in live
    first = _run(root, d, "cached", "--lock-image", "--lock-text", "--frozen-feature-cache", cache)
    assert "frozen-feature cache" in first and "computed" in first and "would compute" not in first
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["parts"]["text"] == "text" and manifest["parts"]["image"] in ("visual", "visual.trunk")
    assert manifest["data"]["image_root"] == str((d.root / "train2017").resolve())
    wl, wc = _weights(root, "live"), _weights(root, "cached")
    _same_weights(wl, wc)
    assert float(wl["logit_scale"]) != pytest.approx(float(torch.tensor(1 / 0.07).log()), abs=1e-6)  # it trained

    def no_compute(*a, **k):
        raise AssertionError("the cache was recomputed")

    def no_decode(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(frozen_features.FrozenFeatures, "_compute", no_compute)
    monkeypatch.setattr(frozen_features, "load_rgb", no_decode)
    import open_clip_train.data.datasets as datasets
    monkeypatch.setattr(datasets, "load_rgb", no_decode)
    again = _run(root, d, "again", "--lock-image", "--lock-text", "--frozen-feature-cache", cache)
    assert "reusing" in again
    _same_weights(wc, _weights(root, "again"))


def test_image_trunk_only_trains_head_like_live(demo):
    root, d = demo
    _run(root, d, "live_img", "--lock-image")
    log = _run(root, d, "cached_img", "--lock-image", "--frozen-feature-cache", root / "cache_img")
    manifest = json.loads((root / "cache_img" / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"image"} and "text" not in manifest["tables"]
    wl, wc = _weights(root, "live_img"), _weights(root, "cached_img")
    _same_weights(wl, wc)
    assert "computed" in log
    text_key = next(k for k in wl if k.startswith("text.") or k.startswith("transformer."))
    assert _moved(wc, _weights(root, "cached_img", 1), text_key)  # the text tower trained on cached images


def _one_error_line(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    return err[0]


def test_manifest_mismatch_and_bad_setups_are_one_error_line(demo, tmp_path, capsys):
    root, d = demo
    cache = root / "cache_mm"
    _run(root, d, "mm0", "--lock-image", "--lock-text", "--frozen-feature-cache", cache, "--epochs", "1")
    # another init seed: other frozen weights, found once the model is built (before any training)
    rc = main(_argv(root, d, "mm1", "--lock-image", "--lock-text", "--frozen-feature-cache", cache, "--seed", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and sum(l.startswith("error: ") for l in err) == 1
    assert "weights_sha256" in err[-1] and "--frozen-feature-cache" in err[-1] and "Traceback" not in "".join(err)
    assert not (root / "logs" / "mm1" / "checkpoints" / "epoch_1.pt").exists()
    other = generate(tmp_path / "other", num_train=24, num_val=2, image_size=32, seed=4)
    err = _one_error_line(capsys, _argv(root, other, "mm2", "--lock-image", "--lock-text",
                                        "--frozen-feature-cache", cache))
    assert "annotations" in err
    import shutil
    copy = shutil.copytree(d.root / "train2017", tmp_path / "elsewhere")  # same ids, other images
    err = _one_error_line(capsys, _argv(root, d, "mm5", "--lock-image", "--lock-text", "--frozen-feature-cache",
                                        cache, "--train-image-root", copy))
    assert "data.image_root" in err
    argv = [a for a in _argv(root, d, "mm3", "--lock-image", "--frozen-feature-cache", tmp_path / "c")
            if a != "--no-augment"]
    assert "augmentation" in _one_error_line(capsys, argv)
    assert "locked" in _one_error_line(capsys, _argv(root, d, "mm4", "--frozen-feature-cache", tmp_path / "c2"))


def test_resume_continues_on_the_cache(demo):
    root, d = demo
    cache = root / "cache_resume"
    flags = ("--lock-image", "--lock-text", "--frozen-feature-cache", cache, "--skip-scheduler")
    _run(root, d, "whole", *flags)
    _run(root, d, "part", *flags, "--epochs", "1")
    log = _run(root, d, "part", *flags, "--resume", "latest")
    assert "resumed" in log and "reusing" in log
    _same_weights(_weights(root, "whole"), _weights(root, "part"))


def test_unlock_switches_the_tower_back_to_live(demo):
    root, d = demo
    flags = ("--lock-image", "--lock-text", "--unfreeze-image-at-epoch", "1", "--unfreeze-text-at-epoch", "1")
    _run(root, d, "live_unlock", *flags)
    log = _run(root, d, "cached_unlock", *flags, "--frozen-feature-cache", root / "cache_unlock")
    assert re.search(r"frozen-feature cache: the image tower unlocks", log)
    assert re.search(r"frozen-feature cache: the text tower unlocks", log)
    wl, wc = _weights(root, "live_unlock"), _weights(root, "cached_unlock")
    _same_weights(wl, wc)
    w1 = _weights(root, "cached_unlock", 1)
    trunk = next(k for k in wc if k.startswith("visual.trunk.") and k.endswith("weight"))
    assert _moved(wc, w1, trunk)  # the trunk trained live after the unlock


def test_two_ranks_compute_their_shards_then_train_like_one_process(demo, tmp_path, monkeypatch):
    """torchrun 2 ranks x 3: each rank computes every other image and caption into its own shard,
    rank 0 writes the manifest, and both train on the whole cache to the weights of one process x 6
    on the live locked towers (--local-loss --gather-with-grad: the global batch's gradients)."""
    from launch import DUMP_SCRIPT, in_process, load, torchrun

    root, d = demo
    script = tmp_path / "dump_main.py"
    script.write_text(DUMP_SCRIPT)
    cache = tmp_path / "cache"
    common = ("--lock-image", "--lock-text", "--local-loss", "--gather-with-grad", "--log-dir", tmp_path / "logs")
    two = _argv(root, d, "two", *common, "--frozen-feature-cache", cache)
    two[two.index("--batch-size") + 1] = "3"
    torchrun(2, script, two, tmp_path / "two")
    (tmp_path / "one").mkdir()
    in_process(_argv(root, d, "one", *common), tmp_path / "one", monkeypatch)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    for rank in (0, 1):  # every other image and caption each
        for table, total in (("image", 24), ("text", len(json.loads(d.train_annotations.read_text())["annotations"]))):
            ids = np.load(cache / f"shard_{rank}.{table}.ids.npy")
            assert len(ids) == (total + 1 - rank) // 2
    assert re.search(r"frozen-feature cache .*: computed", (tmp_path / "logs" / "two" / "out.log").read_text())
    r0, r1, one = (load(tmp_path / p) for p in ("two/rank0.pt", "two/rank1.pt", "one/rank0.pt"))
    assert [k for k in r0 if not torch.equal(r0[k], r1[k])] == []
    _same_weights(one, r0)
    assert abs(float(one["logit_scale"]) - math.log(1 / 0.07)) > 1e-4  # it trained
