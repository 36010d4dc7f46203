"""Teacher embedding cache: extraction (1 rank, and 2 simulated shards), read-back, checks, errors."""
import pytest
import torch

from open_clip_train.data import load_rgb
from open_clip_train.demo_data import generate
from open_clip_train.distill.extract import coco_samples, main, run_shard
from open_clip_train.models import create_model
from open_clip_train.distill.teacher import Teacher
from open_clip_train.distill.cache import (
    TeacherCache,
    augmentation_notice,
    expected_fields,
    file_sha256,
    manifest_meta,
    write_manifest,
)

MODEL = "tiny-convnext-cliptext"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    demo = generate(root / "data", num_train=5, num_val=1, image_size=32, seed=0)
    torch.manual_seed(0)
    model, _ = create_model(MODEL)
    weights = root / "teacher.pt"
    torch.save(model.state_dict(), weights)
    out = root / "cache1"
    rc = main(["--teacher-model", MODEL, "--teacher-pretrained", str(weights), "--dataset-type", "coco",
               "--train-data", str(demo.train_annotations), "--out", str(out), "--batch-size", "3", "--workers", "0",
               "--precision", "fp32"])
    assert rc == 0
    return root, demo, weights, out


@pytest.fixture(scope="module")
def live(setup):
    """Embeddings computed directly, one sample at a time."""
    root, demo, weights, _ = setup
    teacher = Teacher.from_pretrained(MODEL, str(weights))
    samples = coco_samples(demo.train_annotations)
    tf = teacher.preprocess()
    images = torch.cat([teacher.encode_image(tf(load_rgb(p))[None]) for p in samples.paths])
    texts = torch.cat([teacher.encode_text(teacher.tokenizer([c])) for c in samples.captions])
    return teacher, samples, images, texts


def test_round_trip_equals_live(setup, live):
    _, demo, weights, out = setup
    teacher, samples, images, texts = live
    cache = TeacherCache(out)
    assert len(samples.ann_ids) == len(cache) > len(samples.image_ids) == 5
    got_img, got_txt = cache.lookup(samples.image_ids, samples.ann_ids)
    torch.testing.assert_close(got_img, images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_txt, texts, rtol=1e-5, atol=1e-6)
    # a training batch: shuffled pairs, an image repeated with two of its captions
    pick = [6, 0, 1, 0]
    ann = [samples.ann_ids[i] for i in pick]
    img = [samples.caption_image_ids[i] for i in pick]
    assert img[1] == img[2]
    b_img, b_txt = cache.lookup(img, ann)
    torch.testing.assert_close(b_txt, texts[pick], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_img, images[[samples.image_ids.index(i) for i in img]], rtol=1e-5, atol=1e-6)
    out_dict = cache.teacher_outputs([samples.image_ids[0]], [samples.ann_ids[0]])
    assert out_dict["logit_scale"].item() == pytest.approx(float(teacher.logit_scale()))

    m = cache.manifest
    assert m["teacher"]["model"] == MODEL and m["teacher"]["weights_sha256"] == file_sha256(weights)
    assert m["dataset"]["annotations_sha256"] == file_sha256(demo.train_annotations)
    assert m["preprocess"]["size"] == [64, 64] and m["preprocess"]["interpolation"] == "bicubic"
    assert m["embedding"]["image_dim"] == m["embedding"]["text_dim"] == 64
    assert [s["rank"] for s in m["shards"]] == [0]


def test_two_shards_merge(setup, live, tmp_path):
    _, demo, weights, _ = setup
    teacher, samples, images, texts = live
    for rank in range(2):  # what two torchrun ranks write
        run_shard(teacher, samples, tmp_path, rank, 2, batch_size=2)
    meta = manifest_meta(teacher_model=MODEL, weights_path=str(weights), logit_scale=float(teacher.logit_scale()),
                         precision="fp32", annotations=demo.train_annotations, image_root=demo.train_images,
                         preprocess_cfg=teacher.preprocess_cfg)
    manifest = write_manifest(tmp_path, meta, world_size=2)
    assert [s["images"] for s in manifest["shards"]] == [3, 2]
    assert sorted(p.name for p in tmp_path.glob("shard_1.*")) == [
        "shard_1.ann_ids.npy", "shard_1.image.npy", "shard_1.image_ids.npy", "shard_1.text.npy"]
    got_img, got_txt = TeacherCache(tmp_path).lookup(samples.image_ids, samples.ann_ids)
    torch.testing.assert_close(got_img, images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_txt, texts, rtol=1e-5, atol=1e-6)


def test_check_names_the_mismatching_field(setup, tmp_path):
    _, demo, weights, out = setup
    cache = TeacherCache(out)
    cache.check(expected_fields(teacher_model=MODEL, teacher_pretrained=str(weights),
                                annotations=demo.train_annotations))
    cache.check({"teacher": {"model": MODEL}, "preprocess.size": (64, 64)})  # nested or dotted, tuples ok

    other = tmp_path / "other.pt"
    other.write_bytes(b"not the teacher")
    cases = [
        ({"teacher.model": "convnext_base_w"}, "teacher.model"),
        (expected_fields(teacher_pretrained=str(other)), "teacher.weights_sha256"),
        (expected_fields(annotations=demo.val_annotations), "dataset.annotations_sha256"),
        ({"preprocess": {"size": [256, 256]}}, "preprocess.size"),
        ({"preprocess.mean": [0.5, 0.5, 0.5]}, "preprocess.mean"),
    ]
    for expected, field in cases:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
            cache.check(expected)
        assert "\n" not in str(e.value)


def test_missing_ids_and_bad_directories(setup, tmp_path):
    _, demo, weights, out = setup
    cache = TeacherCache(out)
    samples = coco_samples(demo.train_annotations)
    with pytest.raises(ValueError, match=r"1 of 2 images and 2 of 3 captions are missing") as e:
        cache.lookup([samples.image_ids[0], 999_999], [samples.ann_ids[0], -1, 424242])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no manifest.json"):
        TeacherCache(tmp_path)
    # an existing cache is not overwritten by accident
    args = ["--teacher-model", MODEL, "--teacher-pretrained", str(weights), "--train-data", str(demo.train_annotations),
            "--out", str(out), "--workers", "0", "--precision", "fp32"]
    assert main(args) == 2


def test_augmentation_notice():
    assert augmentation_notice(False) is None
    assert "un-augmented" in augmentation_notice(True)
