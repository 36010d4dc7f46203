"""The demo generator's labelled ImageFolder (--zeroshot-out): layout, determinism, true labels."""
import random
from pathlib import Path

import pytest
from PIL import Image

from open_clip_train.demo_data import (COLOURS, POSITIONS, SHAPE_WORDS, ZEROSHOT_TEMPLATES, generate_zeroshot, main,
                                       zeroshot_rng, zeroshot_scene)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("by,classes", [("shape", sorted(SHAPE_WORDS)), ("colour", sorted(COLOURS))])
def test_layout_classnames_and_templates(tmp_path, by, classes):
    root = generate_zeroshot(tmp_path / by, by=by, per_class=2, image_size=32, seed=0)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    assert folders == classes
    assert (root / "classnames.txt").read_text().splitlines() == folders  # ImageFolder's (sorted) order
    assert (root / "templates.txt").read_text().splitlines() == list(ZEROSHOT_TEMPLATES[by])
    assert all("{}" in t for t in ZEROSHOT_TEMPLATES[by])
    for d in folders:
        assert sorted(p.name for p in (root / d).iterdir()) == ["000000.jpg", "000001.jpg"]
        with Image.open(root / d / "000000.jpg") as im:
            assert im.size == (32, 32)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(generate_zeroshot(tmp_path / "a", per_class=3, image_size=32, seed=5))
    b = _files(generate_zeroshot(tmp_path / "b", per_class=3, image_size=32, seed=5))
    c = _files(generate_zeroshot(tmp_path / "c", per_class=3, image_size=32, seed=6))
    assert a == b and a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != c[k] for k in images) > 0.8 * len(images)
    # more images per class keeps the first ones
    d = _files(generate_zeroshot(tmp_path / "d", per_class=4, image_size=32, seed=5))
    assert all(d[k] == a[k] for k in images)


@pytest.mark.parametrize("by", ["shape", "colour"])
def test_every_scene_has_one_object_of_its_class(by):
    classes = sorted(SHAPE_WORDS) if by == "shape" else sorted(COLOURS)
    for label in classes:
        for k in range(30):
            scene = zeroshot_scene(by, label, random.Random(f"{label}{k}"))
            (obj,) = scene.objects
            assert (obj.shape if by == "shape" else obj.colour) == label
            assert obj.colour != scene.background  # always visible


def test_rendered_colour_is_the_class(tmp_path):
    root = generate_zeroshot(tmp_path, by="colour", per_class=4, image_size=64, seed=1)
    for label in sorted(COLOURS):
        for k in range(4):
            obj = zeroshot_scene("colour", label, zeroshot_rng(1, "colour", label, k)).objects[0]
            fx, fy = POSITIONS[obj.position]
            with Image.open(root / label / f"{k:06d}.jpg") as im:
                pixel = im.convert("RGB").getpixel((int(fx * 64), int(fy * 64)))
            nearest = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], pixel)))
            assert nearest == label, (label, k, pixel)


def test_cli(tmp_path, capsys):
    main(["--zeroshot-out", str(tmp_path / "zs"), "--zeroshot-by", "colour", "--zeroshot-per-class", "2",
          "--image-size", "32"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"wrote a zero-shot ImageFolder of 8 colour classes x 2 images to {tmp_path / 'zs'}"]
    assert not (tmp_path / "zs" / "annotations").exists()  # no captioned set without OUT_DIR
    for bad in ([], ["--zeroshot-out", str(tmp_path / "x"), "--zeroshot-per-class", "0"],
                ["--zeroshot-out", str(tmp_path / "x"), "--zeroshot-by", "size"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "x").exists()
