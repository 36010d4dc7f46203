"""The demo shapes dataset: deterministic, valid COCO, captions true to the rendered scenes."""
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from open_clip_train import demo_data
from open_clip_train.demo_data import COLOURS, POSITIONS, SHAPE_WORDS, generate, main

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=24, num_val=8, image_size=SIZE, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(demo, tmp_path):
    again = generate(tmp_path / "again", num_train=24, num_val=8, image_size=SIZE, seed=3)
    other = generate(tmp_path / "other", num_train=24, num_val=8, image_size=SIZE, seed=4)
    files, other_files = _files(demo.root), _files(other.root)
    assert files == _files(again.root)
    assert len(files) == 24 + 8 + 2
    assert files.keys() == other_files.keys()
    differing = [name for name in files if files[name] != other_files[name]]
    assert len(differing) > 0.8 * len(files)


def test_layout_and_coco_format(demo):
    assert demo.train_annotations == demo.root / "annotations" / "captions_train2017.json"
    assert demo.val_annotations == demo.root / "annotations" / "captions_val2017.json"
    train_ids = set()
    for ann_file, image_dir, count in ((demo.train_annotations, demo.train_images, 24),
                                       (demo.val_annotations, demo.val_images, 8)):
        raw = json.loads(ann_file.read_text())
        assert {"info", "licenses", "images", "annotations"} <= raw.keys()
        coco = COCO(str(ann_file))
        assert len(coco.imgs) == count
        assert len({a["id"] for a in raw["annotations"]}) == 5 * count  # unique annotation ids
        for img_id, img in coco.imgs.items():
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"])
            with Image.open(image_dir / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE) == (img["width"], img["height"])
            captions = [a["caption"] for a in coco.imgToAnns[img_id]]
            assert len(captions) == 5 and len(set(captions)) == 5
        if image_dir == demo.train_images:
            train_ids = set(coco.imgs)
        else:
            assert not train_ids & set(coco.imgs)


def _scenes(ann_file: Path):
    raw = json.loads(ann_file.read_text())
    captions = {}
    for a in raw["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"])
    return [(img, img["scene"], captions[img["id"]]) for img in raw["images"]]


def test_captions_name_every_rendered_object(demo):
    counts = set()
    for _, scene, captions in _scenes(demo.train_annotations) + _scenes(demo.val_annotations):
        objects = scene["objects"]
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        assert len({o["position"] for o in objects}) == len(objects)
        for caption in captions:
            for obj in objects:
                assert obj["colour"] in caption
                assert any(single in caption for single, _ in SHAPE_WORDS[obj["shape"]]), (caption, obj)
    assert counts == {1, 2, 3}


def test_rendered_colours_match_the_scene(tmp_path):
    paths = generate(tmp_path, num_train=30, num_val=1, image_size=64, seed=0)
    for img, scene, _ in _scenes(paths.train_annotations):
        with Image.open(paths.train_images / img["file_name"]) as im:
            rgb = im.convert("RGB")
        for obj in scene["objects"]:
            fx, fy = POSITIONS[obj["position"]]
            pixel = rgb.getpixel((int(fx * 64), int(fy * 64)))
            nearest = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], pixel)))
            assert nearest == obj["colour"], (img["file_name"], obj, pixel)


def test_cli_summary_and_validation(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--image-size", "32", "--seed", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "3 train + 2 val" in out[0]
    assert len(list((tmp_path / "cli" / "train2017").glob("*.jpg"))) == 3
    for bad in (["--num-train", "0"], ["--image-size", "4"], ["--seed", "-1"], ["--num-val", "x"]):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path / "bad"), *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0]
    assert not (tmp_path / "bad").exists()


def test_scenes_are_diverse():
    """Most captions should pin down their image among a few hundred: scenes rarely repeat."""
    scenes = [demo_data.random_scene(random.Random(i)) for i in range(300)]
    assert len(set(scenes)) >= 295
