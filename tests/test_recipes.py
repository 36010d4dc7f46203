"""The seed's seven experiment recipes: valid bash, and their --dry-run reproduces the seed's
INIT trainable-parameter counts (the cliptext run with the corrected text count)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "recipes"
SEED_INIT = {
    "coco2017_convnextv2_tiny_gpt2_amp_cosine_bs192x2_nofreeze_lr7.0e-4_wu2.2k": (30070400, 125259008, 155329409),
    "coco2017_convnextv2_tiny_gpt2_amp_cosine_bs192x2_unf35_lr7e-4_wu2.4k": (2203904, 819200, 3023105),
    "coco2017_convnextv2_tiny_cliptext_amp_cosine_bs192x2_unfimg5_lr7e-4_wu2.4k": (2203904, 63428096, 65632001),
    "coco2017_cnbw_absattn_3stage_preval_lr2e-5_bs192x2_10e": (4265600, 0, 4265601),
    "coco2017_cnbw_absattn_distill_lr5e-4_frozen_bs96x4_20e": (3856000, 0, 3856001),
    "coco2017_cnbw_absattn_distill_lr5e-4_imgunf5g2_text10_bs96x4_20e": (3856000, 0, 3856001),
    "coco2017_cnbw_absattn_headalign_lr5e-4_imgunf6g1_text10_bs96x4_acc1_10e": (3856000, 0, 3856001),
}


def test_every_seed_recipe_is_shipped():
    assert {p.stem for p in RECIPES.glob("coco2017_*.sh")} == set(SEED_INIT)


@pytest.mark.parametrize("name", sorted(SEED_INIT))
def test_recipe_dry_run_reproduces_seed_counts(name, tmp_path):
    script = RECIPES / f"{name}.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, DRY_RUN="1", LOG_DIR=str(tmp_path), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"trainable params \(INIT\): visual=(\d+), text=(\d+), total=(\d+)", out.stdout)
    assert m, out.stdout[-2000:]
    assert tuple(int(x) for x in m.groups()) == SEED_INIT[name]
    assert not list(tmp_path.iterdir()), "a dry run must not write a run directory"


# The TeachClip student recipes (no teacher yet): convnext_base_w with seqtransf-afa aggregation.
# Locked: the image head (640 x 1024 projection), the video modules and the logit scale train.
VIDEO_INIT = {
    "msrvtt9k_cnbw_student_xclip_lr1e-4_bs30x4_10e": (88221824, 91163520, 20112641, 199497986),
    "msrvtt7k_cnbw_student_xclip_lr1e-4_bs30x4_10e": (88221824, 91163520, 20112641, 199497986),
    "msrvtt7k_cnbw_student_xclip_locked_lr1e-4_bs30x4_16e": (655360, 0, 20112641, 20768002),
}


def test_every_video_recipe_is_checked():
    assert {p.stem for p in RECIPES.glob("msrvtt*.sh")} == set(VIDEO_INIT)


@pytest.mark.parametrize("name", sorted(VIDEO_INIT))
def test_video_recipe_dry_run(name, tmp_path):
    script = RECIPES / f"{name}.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ, DRY_RUN="1", LOG_DIR=str(tmp_path), HF_HUB_OFFLINE="1", MSRVTT_ROOT=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"trainable params \(INIT\): visual=(\d+), text=(\d+), video=(\d+), total=(\d+)", out.stdout)
    assert m, out.stdout[-2000:]
    assert tuple(int(x) for x in m.groups()) == VIDEO_INIT[name]
    assert "video: video_pool.afa 410,881 params, trainable" in out.stdout
    assert not list(tmp_path.iterdir()), "a dry run must not write a run directory"
