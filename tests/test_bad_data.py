"""Broken inputs: decodable odd images are converted, the rest replaced and counted.

A COCO-style set of 20 images x 5 captions is broken in known ways (zero-byte, truncated and
garbage files, a missing file, an empty caption; PNG-with-alpha, palette GIF, CMYK and L images
that must decode), and a webdataset shard gets an undecodable jpg, a sample without caption,
an empty caption and a truncated tail. The tests check the counts by reason, the substitutes,
the conversions and that layouts of ranks and workers all see the same batches.
"""
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from open_clip_train.data import BadTally, Batch, DataCfg, get_data, load_rgb
from open_clip_train.data.bad_samples import (EMPTY_CAPTION, EMPTY_FILE, MISSING, NO_CAPTION, TRUNCATED, UNDECODABLE,
                                              BadImage, BadSample)
from open_clip_train.demo_data import generate
from open_clip_train.evaluate import drop_unusable
from test_data import byte_tokenizer, decode

PRE = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
BROKEN = {0: EMPTY_FILE, 1: TRUNCATED, 2: MISSING, 3: UNDECODABLE}  # image index -> reason
CONVERTED = {4: "RGBA", 5: "P", 6: "CMYK", 7: "L"}  # image index -> mode written (all decodable)
EMPTY_CAPTION_IMAGE = 9


def odd_image(mode: str) -> bytes:
    """A decodable image in an unusual mode, as file bytes (PNG / GIF / JPEG by mode)."""
    base = Image.new("RGB", (32, 32), (200, 40, 40))
    out = io.BytesIO()
    if mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(Image.new("L", (32, 32), 0))  # fully transparent: must come out white
        image.save(out, "PNG")
    elif mode == "P":
        base.convert("P", palette=Image.Palette.ADAPTIVE).save(out, "GIF")  # (with transparency: test_data)
    elif mode == "CMYK":
        base.convert("CMYK").save(out, "JPEG")
    else:
        base.convert(mode).save(out, "PNG")
    return out.getvalue()


def break_coco(demo, root: Path):
    """Copy the demo train split and break it; returns (annotations, image paths by index)."""
    ann = root / "annotations" / "captions_train2017.json"
    shutil.copytree(demo.train_images, root / "train2017")
    ann.parent.mkdir()
    data = json.loads(demo.train_annotations.read_text())
    paths = [root / "train2017" / img["file_name"] for img in sorted(data["images"], key=lambda i: i["id"])]
    paths[0].write_bytes(b"")
    paths[1].write_bytes(paths[1].read_bytes()[: paths[1].stat().st_size // 2])
    paths[2].unlink()
    paths[3].write_bytes(b"this is not an image at all" * 10)
    for i, mode in CONVERTED.items():
        paths[i].write_bytes(odd_image(mode))
    image_id = sorted(data["images"], key=lambda i: i["id"])[EMPTY_CAPTION_IMAGE]["id"]
    first = min((a for a in data["annotations"] if a["image_id"] == image_id), key=lambda a: a["id"])
    first["caption"] = "   "
    ann.write_text(json.dumps(data))
    return ann, paths


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    demo = generate(tmp_path_factory.mktemp("demo"), num_train=20, num_val=4, image_size=32, seed=0)
    ann, paths = break_coco(demo, tmp_path_factory.mktemp("broken"))
    return demo, ann, paths


def epoch_batches(info, epoch):
    info.set_epoch(epoch)
    return list(info.dataloader)


def expected_counts():
    counts = Counter({reason: 5 for reason in BROKEN.values()})  # 5 captions of each broken image
    counts[EMPTY_CAPTION] = 1
    return counts


# ---- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", sorted(CONVERTED.values()))
def test_odd_modes_decode_to_rgb(mode):
    image = load_rgb(odd_image(mode))
    assert image.mode == "RGB" and image.size == (32, 32)
    r, g, b = image.getpixel((5, 5))
    if mode == "RGBA":
        assert (r, g, b) == (255, 255, 255)  # transparent -> composited on white, not the hidden red
    elif mode == "L":
        assert r == g == b
    else:  # palette / CMYK keep the colour (JPEG and palette quantisation are approximate)
        assert r > 150 and g < 100 and b < 100


def test_half_transparent_pixels_blend_with_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_rgb(_png(image)).getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=1)


def _png(image):
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("index, reason", sorted(BROKEN.items()))
def test_broken_files_are_refused_with_their_reason(broken, index, reason):
    _, _, paths = broken
    with pytest.raises(BadImage) as e:
        load_rgb(str(paths[index]))
    assert e.value.reason == reason


# ---- training: substitutes and counts ------------------------------------------------------------

def test_bad_samples_are_replaced_and_counted_per_epoch(broken):
    _, ann, paths = broken
    info = get_data(DataCfg(train_data=str(ann), batch_size=10), PRE, PRE, byte_tokenizer)["train"]
    bad_sources = {str(paths[i]) for i in BROKEN} | {str(paths[EMPTY_CAPTION_IMAGE])}
    good = {c for c, i in _caption_owner(ann).items() if i not in BROKEN and c}
    for epoch in (0, 1):
        batches = epoch_batches(info, epoch)
        assert len(batches) == 10 and all(isinstance(b, Batch) for b in batches)
        assert all(b[0].shape == (10, 3, 16, 16) and b[1].shape[0] == 10 for b in batches)  # full batches
        tally = BadTally()
        for b in batches:
            tally.add(b.bad)
        assert tally.counts == expected_counts()
        assert {s.source for b in batches for s in b.bad} == bad_sources
        captions = [c for b in batches for c in decode(b[1])]
        assert set(captions) <= good  # every substitute is a good pair
        assert len(captions) - len(set(captions)) == 21  # 21 substitutes duplicate some good pair
    assert [decode(b[1]) for b in epoch_batches(info, 1)] == [decode(b[1]) for b in batches]  # reproducible


def _caption_owner(ann: Path) -> dict:
    data = json.loads(ann.read_text())
    order = {img["id"]: i for i, img in enumerate(sorted(data["images"], key=lambda i: i["id"]))}
    return {a["caption"].strip(): order[a["image_id"]] for a in data["annotations"]}


def test_substitutes_do_not_depend_on_ranks_or_workers(broken):
    _, ann, _ = broken

    def run(world_size, workers):
        infos = [get_data(DataCfg(train_data=str(ann), batch_size=16 // world_size, workers=workers), PRE, PRE,
                          byte_tokenizer, rank, world_size)["train"] for rank in range(world_size)]
        per_rank = [epoch_batches(info, 3) for info in infos]
        images = [torch.cat([b[0] for b in parts]) for parts in zip(*per_rank)]
        bad = sorted((s.reason, s.index) for parts in per_rank for b in parts for s in b.bad)
        return images, bad

    one_images, one_bad = run(1, 0)
    assert one_bad and len(one_images) == 6
    for layout in ((2, 0), (1, 2)):  # the feature all_gather needs equal batches on every rank
        images, bad = run(*layout)
        assert bad == one_bad
        assert all(torch.equal(a, b) for a, b in zip(images, one_images))


def test_a_fully_broken_dataset_still_yields_full_batches(tmp_path, broken):
    demo, _, _ = broken
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    shutil.copy(demo.train_annotations, ann)
    (tmp_path / "train2017").mkdir()  # every listed file is missing
    info = get_data(DataCfg(train_data=str(ann), batch_size=10), PRE, PRE, byte_tokenizer)["train"]
    batch = next(iter(info.dataloader))
    assert batch[0].shape == (10, 3, 16, 16) and not batch[0].any()  # black stand-ins, for the limit to stop
    assert [s.reason for s in batch.bad] == [MISSING] * 10


def test_batch_survives_pickling_and_pinning():
    import pickle

    batch = Batch((torch.zeros(2, 3), torch.ones(2)), [BadSample(MISSING, "x.jpg", 1)])
    again = pickle.loads(pickle.dumps(batch))
    images, tokens = again
    assert again.bad == batch.bad and torch.equal(images, batch[0]) and torch.equal(tokens, batch[1])


def test_tally_describes_counts_and_examples():
    tally = BadTally()
    tally.add([BadSample(MISSING, f"{i}.jpg") for i in range(4)] + [BadSample(EMPTY_CAPTION, "e.jpg")])
    other = BadTally()
    other.add([BadSample(TRUNCATED, "t.jpg")])
    merged = tally.merge([other])
    assert merged.total == 6 and merged.examples == ["0.jpg", "1.jpg", "2.jpg"]
    assert merged.describe(of=600) == ("6 bad samples of 600 (1.0%): empty caption=1, missing file=4, "
                                       "truncated image=1; e.g. 0.jpg, 1.jpg, 2.jpg")


# ---- evaluation ------------------------------------------------------------------------------------

def test_bad_val_images_are_flagged_and_left_out(broken):
    _, ann, paths = broken
    val = get_data(DataCfg(val_data=str(ann), batch_size=8), PRE, PRE, byte_tokenizer)["val"]
    assert len(val.images) == 20 and val.texts.shape[0] == 99  # the empty caption is dropped at load
    assert val.dropped.counts == Counter({EMPTY_CAPTION: 1})
    flagged = {s.index: s.reason for b in val.image_loader(0, 1, 8, 0) for s in b.bad}
    assert flagged == BROKEN
    usable = torch.tensor([i not in BROKEN for i in range(20)])
    img, txt = torch.eye(20), torch.arange(99.0)[:, None]
    kept_img, kept_txt, t2i = drop_unusable(img, txt, val.text_to_image, usable)
    assert kept_img.shape[0] == 16 and kept_txt.shape[0] == 99 - 20
    # every kept caption still points at its own image, renumbered
    assert torch.equal(kept_img[t2i], img[val.text_to_image][usable[val.text_to_image]])


# ---- webdataset -----------------------------------------------------------------------------------

def _member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def broken_shard(broken, tmp_path_factory):
    """12 good pairs, then an undecodable jpg, a jpg without caption, an empty caption, and a
    last sample whose jpg is cut off mid-member (the tar ends early)."""
    demo = broken[0]
    jpgs = sorted(demo.train_images.glob("*.jpg"))
    out = tmp_path_factory.mktemp("wds") / "broken-000.tar"
    with tarfile.open(out, "w") as tar:
        for i in range(12):
            _member(tar, f"s{i:03d}.jpg", jpgs[i].read_bytes())
            _member(tar, f"s{i:03d}.txt", f"good caption {i}".encode())
        _member(tar, "s100.jpg", b"garbage" * 40)
        _member(tar, "s100.txt", b"undecodable image")
        _member(tar, "s101.jpg", jpgs[0].read_bytes())  # no .txt
        _member(tar, "s102.jpg", jpgs[1].read_bytes())
        _member(tar, "s102.txt", b"  ")
        _member(tar, "s103.txt", b"caption of a truncated jpg")
        _member(tar, "s103.jpg", jpgs[2].read_bytes())
    data = out.read_bytes()
    cut = data.rfind(jpgs[2].read_bytes()[:64])
    out.write_bytes(data[: cut + 100])  # inside the last member
    return out


def test_webdataset_broken_members_are_dropped_and_counted(broken_shard):
    cfg = DataCfg(train_data=str(broken_shard), train_num_samples=12, batch_size=4)
    batches = list(get_data(cfg, PRE, PRE, byte_tokenizer)["train"].dataloader)
    assert len(batches) == 3 and all(b[0].shape[0] == 4 for b in batches)
    assert sorted(c for b in batches for c in decode(b[1])) == sorted(f"good caption {i}" for i in range(12))
    tally = BadTally()
    for b in batches:
        tally.add(b.bad)
    # the truncated tail is a broken member (webdataset's handler) and leaves its caption alone
    assert tally.counts[UNDECODABLE] == 1 and tally.counts[NO_CAPTION] == 1 and tally.counts[EMPTY_CAPTION] == 1
    assert tally.counts["broken shard member"] >= 1
    assert any("s100" in e for e in tally.examples)


def test_webdataset_val_counts_broken_members(broken_shard):
    val = get_data(DataCfg(dataset_type="webdataset", val_data=str(broken_shard)), PRE, PRE, byte_tokenizer)["val"]
    # 12 good images + the undecodable one (left out at encoding time, see ImageDataset)
    assert len(val.images) == 13
    assert val.dropped.counts[NO_CAPTION] == 1 and val.dropped.counts[EMPTY_CAPTION] == 1
    assert val.dropped.counts["broken shard member"] >= 1
    flagged = [s for i in range(len(val.images)) for s in val.images[i][2]]
    assert [s.reason for s in flagged] == [UNDECODABLE] and "s100" in flagged[0].source
