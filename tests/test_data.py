"""Data loading: COCO / CSV / webdataset / synthetic sources, the global batch sampler, retrieval data."""
import importlib.util
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from open_clip_train.data import DataCfg, get_data, load_rgb
from open_clip_train.data.coco import load_coco_captions
from open_clip_train.data.sampler import GlobalBatchSampler, contiguous_shard, seeded_rng
from open_clip_train.demo_data import generate

CTX = 192
PLAIN = T.ToTensor()
AUGMENT = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def byte_tokenizer(texts: list[str]) -> torch.Tensor:
    """Reversible 'tokens' (utf-8 bytes, zero padded), so tests can read captions back."""
    return torch.tensor([list(t.encode().ljust(CTX, b"\0")[:CTX]) for t in texts], dtype=torch.long)


def decode(tokens: torch.Tensor) -> list[str]:
    return [bytes(row.tolist()).rstrip(b"\0").decode() for row in tokens]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 20 train images x 5 captions = 100 pairs; 6 val images
    return generate(tmp_path_factory.mktemp("demo"), num_train=20, num_val=6, image_size=32, seed=0)


def coco_cfg(demo, **kw) -> DataCfg:
    base = dict(train_data=str(demo.train_annotations), batch_size=10, workers=0, seed=0)
    return DataCfg(**{**base, **kw})


def epoch_captions(info, epoch: int) -> list[str]:
    info.set_epoch(epoch)
    return [c for _, tokens in info.dataloader for c in decode(tokens)]


# ---- COCO --------------------------------------------------------------------------------

def test_coco_all_covers_every_pair_once_per_epoch(demo):
    info = get_data(coco_cfg(demo), PLAIN, PLAIN, byte_tokenizer)["train"]
    coco = load_coco_captions(demo.train_annotations)
    all_pairs = Counter(c for caps in coco.captions for c in caps)
    assert (info.num_samples, info.num_batches, len(info.dataloader)) == (100, 10, 10)
    epoch0, epoch1 = epoch_captions(info, 0), epoch_captions(info, 1)
    assert Counter(epoch0) == Counter(epoch1) == all_pairs
    assert epoch0 != epoch1  # reshuffled
    assert epoch_captions(info, 0) == epoch0  # deterministically


def test_coco_images_match_their_captions(demo):
    info = get_data(coco_cfg(demo), PLAIN, PLAIN, byte_tokenizer)["train"]
    coco = load_coco_captions(demo.train_annotations)
    image_of = {c: i for i, caps in enumerate(coco.captions) for c in caps}
    images, tokens = next(iter(info.dataloader))
    assert images.shape == (10, 3, 32, 32) and tokens.shape == (10, CTX)
    for image, caption in zip(images, decode(tokens)):
        expected = PLAIN(Image.open(coco.paths[image_of[caption]]).convert("RGB"))
        assert torch.equal(image, expected)


def test_coco_random_sampling_one_caption_per_image(demo):
    info = get_data(coco_cfg(demo, coco_caption_sampling="random", batch_size=5), PLAIN, PLAIN,
                    byte_tokenizer)["train"]
    coco = load_coco_captions(demo.train_annotations)
    image_of = {c: i for i, caps in enumerate(coco.captions) for c in caps}
    assert (info.num_samples, info.num_batches) == (20, 4)
    drawn = [epoch_captions(info, e) for e in range(3)]
    for captions in drawn:
        assert sorted(image_of[c] for c in captions) == list(range(20))
    assert len({frozenset(c) for c in drawn}) == 3  # other captions drawn each epoch
    again = get_data(coco_cfg(demo, coco_caption_sampling="random", batch_size=5), PLAIN, PLAIN,
                     byte_tokenizer)["train"]
    assert epoch_captions(again, 2) == drawn[2]


def test_coco_image_root_override_and_missing_folder(demo, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(demo.train_images, moved)
    coco = load_coco_captions(demo.train_annotations, image_root=moved)
    assert all(Path(p).parent == moved for p in coco.paths)
    ann = tmp_path / "annotations" / "captions_nowhere.json"
    ann.parent.mkdir()
    shutil.copy(demo.train_annotations, ann)
    with pytest.raises(ValueError, match="nowhere"):
        load_coco_captions(ann)


def test_coco_val_retrieval_data(demo):
    val = get_data(DataCfg(val_data=str(demo.val_annotations), batch_size=4), PLAIN, PLAIN,
                   byte_tokenizer)["val"]
    coco = load_coco_captions(demo.val_annotations)
    assert len(val.images) == 6
    assert val.texts.shape == (30, CTX) and val.texts.dtype == torch.long
    assert torch.equal(val.text_to_image, torch.arange(6).repeat_interleave(5))
    assert val.captions == [c for caps in coco.captions for c in caps] == decode(val.texts)
    image, index, bad = val.images[4]
    assert index == 4 and bad == () and torch.equal(image, PLAIN(Image.open(coco.paths[4]).convert("RGB")))

    for world_size in (1, 4):  # 6 images over 4 ranks: blocks of 1, 2, 1, 2
        seen, texts = [], []
        for rank in range(world_size):
            block = [i for _, idx in val.image_loader(rank, world_size, 4, 0) for i in idx.tolist()]
            assert block == list(range(block[0], block[0] + len(block)))  # contiguous
            seen += block
            texts += range(30)[val.text_shard(rank, world_size)]
        assert seen == list(range(6)) and texts == list(range(30))

    capped = get_data(DataCfg(val_data=str(demo.val_annotations), val_num_samples=2), PLAIN, PLAIN,
                      byte_tokenizer)["val"]
    assert len(capped.images) == 2 and capped.texts.shape[0] == 10


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"images": []}', "annotations"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1}]}',
     "annotations[0] is missing key 'caption'"),
    ('{"images": [{"id": 1}], "annotations": []}', "images[0] is missing key 'file_name'"),
    ('{"images": [], "annotations": [{"id": 1, "image_id": 7, "caption": "x"}]}', "unknown image_id 7"),
])
def test_malformed_coco_json_names_file_and_problem(tmp_path, content, problem):
    ann = tmp_path / "annotations" / "captions_bad.json"
    ann.parent.mkdir()
    ann.write_text(content)
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError) as exc:
        get_data(DataCfg(train_data=str(ann)), PLAIN, PLAIN, byte_tokenizer)
    message = str(exc.value)
    assert str(ann) in message and problem in message and "\n" not in message


# ---- sampler ------------------------------------------------------------------------------

def test_two_ranks_of_8_see_the_global_batches_of_one_rank_of_16():
    one = GlobalBatchSampler(100, 16, seed=5)
    ranks = [GlobalBatchSampler(100, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    for epoch in range(3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = list(one)
        assert len(batches) == 6 == one.num_batches  # 100 // 16, incomplete global batch dropped
        per_rank = [list(s) for s in ranks]
        assert [a + b for a, b in zip(*per_rank)] == batches
        expected = torch.randperm(100, generator=torch.Generator().manual_seed(5 + epoch))[:96]
        assert sum(batches, []) == expected.tolist()


def test_set_epoch_reorders_deterministically():
    s = GlobalBatchSampler(50, 5, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[0] == orders[2] != orders[1]
    fresh = GlobalBatchSampler(50, 5, seed=1)
    fresh.set_epoch(1)
    assert list(fresh) == orders[1]


def test_start_batch_skips_once():
    s = GlobalBatchSampler(40, 4, rank=1, world_size=2, seed=0)
    full = list(s)
    s.start_batch = 3
    assert len(s) == 2 and list(s) == full[3:]
    assert list(s) == full  # consumed: the next epoch is whole again


def test_data_info_start_batch_for_resume(demo):
    info = get_data(coco_cfg(demo), PLAIN, PLAIN, byte_tokenizer)["train"]
    full = epoch_captions(info, 2)
    info.set_epoch(2, start_batch=7)
    assert len(info.dataloader) == 3
    assert [c for _, t in info.dataloader for c in decode(t)] == full[70:]


def test_random_groups_and_cap_in_sampler():
    offsets = torch.tensor([0, 2, 5, 6, 10])
    s = GlobalBatchSampler(10, 2, group_offsets=offsets, seed=3)
    picks = sum(list(s), [])
    groups = torch.bucketize(torch.tensor(picks), offsets[1:], right=True).tolist()
    assert sorted(groups) == [0, 1, 2, 3]
    capped = GlobalBatchSampler(100, 10, max_samples=35, seed=3)
    uncapped = GlobalBatchSampler(100, 10, seed=3)
    assert capped.num_batches == 3
    assert sum(list(capped), []) == sum(list(uncapped), [])[:30]


def test_contiguous_shard():
    blocks = [contiguous_shard(10, r, 3) for r in range(3)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError):
        contiguous_shard(10, 3, 3)


def test_train_num_samples_caps_the_epoch(demo):
    info = get_data(coco_cfg(demo, train_num_samples=35), PLAIN, PLAIN, byte_tokenizer)["train"]
    assert (info.num_samples, info.num_batches) == (30, 3)
    full = get_data(coco_cfg(demo), PLAIN, PLAIN, byte_tokenizer)["train"]
    assert epoch_captions(info, 1) == epoch_captions(full, 1)[:30]
    with pytest.raises(ValueError, match="global batch"):
        get_data(coco_cfg(demo, train_num_samples=15, batch_size=8), PLAIN, PLAIN, byte_tokenizer, 0, 2)


def test_augmented_batches_do_not_depend_on_world_size_or_workers(demo):
    def batches(world_size, workers, epochs=(1, 2)):
        """Per epoch, the global batches of images; the same loaders (and workers) across epochs."""
        infos = [get_data(coco_cfg(demo, batch_size=16 // world_size, workers=workers), AUGMENT, PLAIN,
                          byte_tokenizer, rank, world_size)["train"] for rank in range(world_size)]
        out = []
        for epoch in epochs:
            per_rank = []
            for info in infos:
                info.set_epoch(epoch)
                per_rank.append([images for images, _ in info.dataloader])
            out.append([torch.cat(parts) for parts in zip(*per_rank)])
        return out

    single = batches(1, 0)
    assert len(single[0]) == 6
    for other in (batches(2, 0), batches(1, 2)):  # persistent workers must follow set_epoch too
        for epoch_a, epoch_b in zip(single, other):
            assert all(torch.equal(a, b) for a, b in zip(epoch_a, epoch_b))

    info = get_data(coco_cfg(demo), AUGMENT, PLAIN, byte_tokenizer)["train"]
    crops = []
    for epoch in (1, 2, 1):
        info.set_epoch(epoch)
        crops.append(info.dataloader.dataset[0][0])
    assert torch.equal(crops[0], crops[2]) and not torch.equal(crops[0], crops[1])  # new crop each epoch


def test_loader_settings_follow_workers_and_device(demo):
    for workers in (0, 2):
        loader = get_data(coco_cfg(demo, workers=workers), PLAIN, PLAIN, byte_tokenizer)["train"].dataloader
        assert loader.persistent_workers == (workers > 0)
        assert loader.pin_memory == torch.cuda.is_available()


def test_seeded_rng_restores_the_training_process_streams():
    torch.manual_seed(0)
    random.seed(0)
    expected = torch.rand(3), random.random()
    torch.manual_seed(0)
    random.seed(0)
    with seeded_rng(123):
        inside = torch.rand(1), random.random()
    after = torch.rand(3), random.random()
    assert torch.equal(after[0], expected[0]) and after[1] == expected[1]
    with seeded_rng(123):  # same seed, same draws
        assert torch.equal(torch.rand(1), inside[0]) and random.random() == inside[1]


# ---- CSV ----------------------------------------------------------------------------------

def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))


def test_csv_train_pairs_and_val_grouped_by_image(demo, tmp_path):
    names = sorted(p.name for p in demo.train_images.glob("*.jpg"))[:3]
    rows = [(names[0], "first a"), (names[1], "second a"), (names[0], "first b"),
            (names[2], "third a"), (names[1], "second b")]
    tsv = tmp_path / "pairs.tsv"
    write_tsv(tsv, rows)
    cfg = DataCfg(train_data=str(tsv), val_data=str(tsv), train_image_root=str(demo.train_images),
                  val_image_root=str(demo.train_images), batch_size=5)
    data = get_data(cfg, PLAIN, PLAIN, byte_tokenizer)
    assert sorted(epoch_captions(data["train"], 0)) == sorted(c for _, c in rows)
    val = data["val"]
    assert len(val.images) == 3
    assert val.captions == ["first a", "first b", "second a", "second b", "third a"]
    assert val.text_to_image.tolist() == [0, 0, 1, 1, 2]
    assert torch.equal(val.images[1][0], PLAIN(Image.open(demo.train_images / names[1]).convert("RGB")))


def test_csv_missing_column(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("path\ttitle\nx.jpg\thello\n")
    with pytest.raises(ValueError, match="no column 'filepath'"):
        get_data(DataCfg(train_data=str(tsv)), PLAIN, PLAIN, byte_tokenizer)


# ---- webdataset ---------------------------------------------------------------------------

def coco_to_wds():
    path = Path(__file__).resolve().parents[1] / "scripts" / "coco_to_wds.py"
    spec = importlib.util.spec_from_file_location("coco_to_wds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds")
    argv = [str(demo.train_annotations), str(out), "--shard-size", "30", "--pattern", "demo-%03d.tar"]
    coco_to_wds().main(argv)
    return out


def test_coco_to_wds_writes_one_sample_per_pair(demo, shards):
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"demo-{i:03d}.tar" for i in range(4)]
    assert json.loads((shards / "sizes.json").read_text()) == {
        "demo-000.tar": 30, "demo-001.tar": 30, "demo-002.tar": 30, "demo-003.tar": 10}
    coco = load_coco_captions(demo.train_annotations)
    found = Counter()
    with tarfile.open(shards / "demo-001.tar") as tar:
        names = tar.getnames()
        assert len(names) == 90 and {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
        for name in names[:30]:
            if name.endswith(".json"):
                meta = json.load(tar.extractfile(name))
                i = coco.image_ids.index(meta["image_id"])
                key = name[: -len(".json")]
                caption = coco.captions[i][meta["caption_index"]]
                assert tar.extractfile(key + ".txt").read().decode() == caption
                assert tar.extractfile(key + ".jpg").read() == Path(coco.paths[i]).read_bytes()
                found[i] += 1
    assert found


def test_webdataset_train_round_trip(demo, shards):
    coco = load_coco_captions(demo.train_annotations)
    cfg = DataCfg(train_data=str(shards / "demo-{000..003}.tar"), batch_size=10, seed=0)
    info = get_data(cfg, PLAIN, PLAIN, byte_tokenizer)["train"]  # size from sizes.json
    assert (info.sampler, info.num_samples, info.num_batches) == (None, 100, 10)
    image_of = {c: i for i, caps in enumerate(coco.captions) for c in caps}
    batches = list(info.dataloader)
    assert len(batches) == 10
    all_pairs = Counter(c for caps in coco.captions for c in caps)
    assert Counter(c for _, t in batches for c in decode(t)) == all_pairs
    images, tokens = batches[0]
    for image, caption in zip(images, decode(tokens)):
        assert torch.equal(image, PLAIN(Image.open(coco.paths[image_of[caption]]).convert("RGB")))
    info.set_epoch(0)
    assert [decode(t) for _, t in info.dataloader] == [decode(t) for _, t in batches]  # reproducible
    info.set_epoch(1)
    assert [decode(t) for _, t in info.dataloader] != [decode(t) for _, t in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_mid_epoch_resume_reads_past_the_done_batches(shards, workers):
    """A stream cannot seek: the resumed epoch reads and drops its first batches, and what
    follows is exactly the rest of the uninterrupted epoch (also with several workers, whose
    batches the loader interleaves)."""
    cfg = DataCfg(train_data=str(shards / "demo-{000..003}.tar"), batch_size=10, seed=0, workers=workers)
    info = get_data(cfg, PLAIN, PLAIN, byte_tokenizer)["train"]
    info.set_epoch(1)
    full = [decode(t) for _, t in info.batches()]
    fresh = get_data(cfg, PLAIN, PLAIN, byte_tokenizer)["train"]  # a new process after the crash
    fresh.set_epoch(1, start_batch=4)
    assert [decode(t) for _, t in fresh.batches()] == full[4:]
    fresh.set_epoch(2)  # the skip is used up: the next epoch is whole
    assert len(list(fresh.batches())) == len(full) == 10


def test_webdataset_needs_num_samples_without_sizes(shards, tmp_path):
    for shard in shards.glob("*.tar"):
        shutil.copy(shard, tmp_path)
    cfg = DataCfg(train_data=str(tmp_path / "demo-{000..003}.tar"), batch_size=10)
    with pytest.raises(ValueError, match="train_num_samples"):
        get_data(cfg, PLAIN, PLAIN, byte_tokenizer)
    info = get_data(DataCfg(**{**vars(cfg), "train_num_samples": 40}), PLAIN, PLAIN, byte_tokenizer)["train"]
    assert (info.num_batches, len(list(info.dataloader))) == (4, 4)
    with pytest.raises(ValueError, match="shards"):
        too_many_workers = DataCfg(**{**vars(cfg), "train_num_samples": 40, "workers": 3})
        get_data(too_many_workers, PLAIN, PLAIN, byte_tokenizer, rank=0, world_size=2)


def test_webdataset_val_regroups_pairs_into_images(demo, shards):
    cfg = DataCfg(dataset_type="webdataset", val_data=str(shards / "demo-{000..003}.tar"))
    val = get_data(cfg, PLAIN, PLAIN, byte_tokenizer)["val"]
    coco = load_coco_captions(demo.train_annotations)
    assert len(val.images) == 20 and val.texts.shape == (100, CTX)
    for i in range(20):
        image, index, _ = val.images[i]
        j = next(j for j, p in enumerate(coco.paths) if torch.equal(image, PLAIN(load_rgb(p))))
        mine = [c for c, owner in zip(val.captions, val.text_to_image.tolist()) if owner == i]
        assert index == i and sorted(mine) == sorted(coco.captions[j])


# ---- synthetic, dispatch, decoding --------------------------------------------------------

def test_synthetic_train_only():
    cfg = DataCfg(dataset_type="synthetic", train_num_samples=40, batch_size=8)
    pre = T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor()])
    info = get_data(cfg, pre, pre, byte_tokenizer)["train"]
    images, tokens = next(iter(info.dataloader))
    assert images.shape == (8, 3, 24, 24) and tokens.shape == (8, CTX) and info.num_batches == 5
    assert torch.equal(next(iter(get_data(cfg, pre, pre, byte_tokenizer)["train"].dataloader))[0], images)
    with pytest.raises(ValueError, match="train_num_samples"):
        get_data(DataCfg(dataset_type="synthetic"), pre, pre, byte_tokenizer)
    with pytest.raises(ValueError, match="training only"):
        DataCfg(dataset_type="synthetic", train_num_samples=8, val_data="x")


def test_config_validation_and_type_inference():
    with pytest.raises(ValueError, match="dataset_type"):
        DataCfg(dataset_type="parquet")
    with pytest.raises(ValueError, match="coco_caption_sampling"):
        DataCfg(coco_caption_sampling="some")
    with pytest.raises(ValueError, match="cannot infer"):
        get_data(DataCfg(train_data="/data/train.parquet"), PLAIN, PLAIN, byte_tokenizer)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    image = Image.new("RGB", (8, 8), (200, 30, 30)).convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    path = tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg"
    image.save(path)
    for source in (str(path), path.read_bytes()):
        out = load_rgb(source)
        assert out.mode == "RGB" and out.size == (8, 8)
