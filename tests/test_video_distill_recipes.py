"""The TeachClip recipes' teacher parts: extraction once into the cache, then training from it."""
import os
import subprocess
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "recipes"
RECIPE = RECIPES / "msrvtt9k_cnbw_student_xclip_lr1e-4_bs30x4_10e.sh"
LOCKED = RECIPES / "msrvtt7k_cnbw_student_xclip_locked_lr1e-4_bs30x4_16e.sh"


def launch(tmp_path, recipe=RECIPE, **env):
    """Run the recipe with a torchrun that only records its command lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    full = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), MSRVTT_ROOT="/data/m",
                TEACHER_CACHE=str(tmp_path / "cache"), TEACHER_PRETRAINED="/w/x.bin", **env)
    subprocess.run(["bash", str(recipe)], env=full, check=True, cwd=tmp_path, timeout=60)
    return calls.read_text().splitlines()


def test_extracts_once_then_trains_from_the_cache(tmp_path):
    first = launch(tmp_path)
    assert len(first) == 2
    extract, train = first
    assert "-m open_clip_train.extract_teacher --dataset-type msrvtt --train-data /data/m --msrvtt-train-split 9k" \
        in extract
    assert f"--teacher-model xclip --teacher-pretrained /w/x.bin --out {tmp_path / 'cache'}" in extract
    assert "--max-frames 12 --max-words 32" in extract and "--max-frames 12 --max-words 32" in train
    assert "-m open_clip_train.main" in train
    assert f"--distill --teacher-model xclip --teacher-cache {tmp_path / 'cache'}" in train
    assert f"--name {RECIPE.stem}-distill-xclip " in train

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    again = launch(tmp_path)
    assert len(again) == 1 and again[0] == train  # the cache is there: no second extraction
    assert "--overwrite" in launch(tmp_path, REEXTRACT="1")[0]


def test_live_teacher_and_no_teacher(tmp_path):
    (live,) = launch(tmp_path, LIVE_TEACHER="1")
    assert "--distill --teacher-model xclip --teacher-pretrained /w/x.bin" in live and "--teacher-cache" not in live
    (plain,) = launch(tmp_path, DISTILL="0")
    assert "--distill" not in plain and f"--name {RECIPE.stem} " in plain


def test_the_locked_recipe_caches_its_frozen_encoders_and_the_others_do_not(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    (train,) = launch(tmp_path, LOCKED)
    assert f"--frozen-feature-cache ./frozen_cache/{LOCKED.stem}-distill-xclip" in train
    assert "--lock-image --lock-text" in train and f"--teacher-cache {tmp_path / 'cache'}" in train
    (mine,) = launch(tmp_path, LOCKED, FROZEN_CACHE="/fast/fc")
    assert "--frozen-feature-cache /fast/fc" in mine
    for env in ({"FROZEN_CACHE": "none"}, {"LIVE_TEACHER": "1"}):
        (live,) = launch(tmp_path, LOCKED, **env)
        assert "--frozen-feature-cache" not in live
    (unlocked,) = launch(tmp_path)  # its image tower trains: nothing frozen to cache
    assert "--frozen-feature-cache" not in unlocked
