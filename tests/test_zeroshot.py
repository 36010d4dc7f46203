"""Zero-shot classification: answers worked out by hand, upstream's keys and frequency, errors,
the demo's labelled folder with a real tiny model, and 2 ranks == 1."""
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zeroshot_fakes as fakes
from launch import torchrun
from open_clip_train.distributed import World
from open_clip_train.zeroshot import ZeroShotCfg, ZeroShotEvaluator, build_sets, evaluate_zeroshot

CPU = torch.device("cpu")


def _write_lines(path: Path, lines) -> str:
    path.write_text("".join(f"{x}\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stripes")
    samples = fakes.write_stripes(root / "data", 40, seed=0)
    names = _write_lines(root / "classnames.txt", fakes.CLASSNAMES)
    templates = _write_lines(root / "templates.txt", fakes.TEMPLATES)
    return root, samples, names, templates


def _expected(samples):
    """Top-1 / top-5 from the definition, in numpy: stripe means vs template-averaged class vectors."""
    eye = np.eye(fakes.NUM_CLASSES)
    w = []
    for k in range(fakes.NUM_CLASSES):
        per_template = [eye[k], eye[k] + 0.5 * eye[(k + 1) % fakes.NUM_CLASSES]]
        mean = np.mean([v / np.linalg.norm(v) for v in per_template], axis=0)
        w.append(mean / np.linalg.norm(mean))
    w = np.stack(w)
    top1 = top5 = 0
    for path, label in samples:
        px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
        f = px.mean(axis=(0, 2)).reshape(fakes.NUM_CLASSES, -1).mean(-1)
        order = np.argsort(-(w @ (f / np.linalg.norm(f))))
        top1 += order[0] == label
        top5 += label in order[:5]
    return top1 / len(samples), top5 / len(samples)


def _cfg(root: Path, names, templates, **kw):
    return ZeroShotCfg(data=str(root / "data"), classnames=names, templates=templates, frequency=1,
                       batch_size=7, workers=0, **kw)


def test_top1_top5_match_the_hand_computation(stripes):
    root, samples, names, templates = stripes
    want1, want5 = _expected(samples)
    assert 0.3 < want1 < 1.0 and want5 > want1  # the set is not trivially right or wrong
    got = evaluate_zeroshot(fakes.StripeModel(), fakes.tokenize, fakes.to_tensor, _cfg(root, names, templates),
                            epoch=1, epochs=3, device=CPU, precision="fp32", world=World())
    assert got == {"zeroshot-data-top1": pytest.approx(want1, abs=1e-12),
                   "zeroshot-data-top5": pytest.approx(want5, abs=1e-12)}


def test_key_name_and_model_mode(stripes):
    root, samples, names, templates = stripes
    model = fakes.StripeModel().train()
    ev = ZeroShotEvaluator(_cfg(root, names, templates, name="My Shapes!"), fakes.to_tensor, fakes.tokenize)
    got = ev(model, 2, 2, CPU, "fp32", World())
    assert set(got) == {"zeroshot-my-shapes-top1", "zeroshot-my-shapes-top5"}
    assert model.training  # restored after evaluating in eval mode


def test_no_top5_with_five_classes_or_fewer(tmp_path):
    for k in range(3):
        (tmp_path / "d" / f"k{k}").mkdir(parents=True)
        Image.new("RGB", (24, 24), (10 * k, 0, 0)).save(tmp_path / "d" / f"k{k}" / "a.png")
    sets = build_sets(ZeroShotCfg(data=str(tmp_path / "d")))
    assert [s.classnames for s in sets] == [["k0", "k1", "k2"]]  # folder names when no file is given
    assert len(sets[0].templates) == 80  # OpenAI's ImageNet prompts by default


@pytest.mark.parametrize("epoch,epochs,freq,due", [
    (0, 10, 2, True), (1, 10, 2, False), (2, 10, 2, True), (9, 10, 2, False), (10, 10, 2, True),
    (3, 3, 2, True), (3, 10, 0, False), (0, 10, 0, False), (3, 10, 1, True), (4, 7, 3, False), (6, 7, 3, True),
])
def test_frequency_is_upstreams(epoch, epochs, freq, due):
    assert ZeroShotCfg(imagenet_val="x", frequency=freq).due(epoch, epochs) is due


def test_not_due_returns_nothing_and_reads_nothing(stripes):
    root, _, names, templates = stripes
    cfg = ZeroShotCfg(data=str(root / "data"), classnames=names, templates=templates, frequency=2)
    boom = torch.nn.Module()  # any call into the model would raise
    assert ZeroShotEvaluator(cfg, fakes.to_tensor, fakes.tokenize)(boom, 1, 5, CPU, "fp32", World()) == {}
    assert not ZeroShotCfg().enabled and ZeroShotEvaluator(ZeroShotCfg(), None, None).sets == []


def test_imagenet_keys_and_v2_labels_from_folder_numbers(tmp_path, monkeypatch):
    """ImageNet val and v2 under upstream's keys; v2's labels are its folders' numbers (not their
    sorted order: '10' sorts before '2'). A 12-class stand-in for the 1000 classes."""
    import open_clip

    names = [f"c{k}" for k in range(12)]
    monkeypatch.setattr(open_clip, "IMAGENET_CLASSNAMES", names)
    monkeypatch.setattr(open_clip, "OPENAI_IMAGENET_TEMPLATES", ["t0 {}"])
    monkeypatch.setattr("open_clip_train.zeroshot.IMAGENET_CLASSES", 12)
    eye = torch.eye(12, dtype=torch.float64)

    class OneHot(torch.nn.Module):  # image k (its red value) -> class k, then k - 1; text c<k> -> class k
        def encode_image(self, x, normalize=False):
            k = (x[:, 0, 0, 0] * 255).round().long()
            return eye[k] + 0.1 * eye[(k - 1) % 12]

        def encode_text(self, tokens, normalize=False):
            return eye[tokens[:, 1]]

    def tok(texts):
        return torch.tensor([[0, int(t.split("c")[1])] for t in texts])

    val, v2 = tmp_path / "val", tmp_path / "v2" / "ImageNetV2-matched-frequency"
    for k in range(12):
        for root, name in ((val, f"n{k:08d}"), (v2, str(k))):
            (root / name).mkdir(parents=True)
            # v2: the image shows class k, except class 2's, which shows 3 (one wrong of 12)
            shown = 3 if root == v2 and k == 2 else k
            Image.new("RGB", (2, 2), (shown, 0, 0)).save(root / name / "x.png")
    cfg = ZeroShotCfg(imagenet_val=str(val), imagenet_v2=str(tmp_path / "v2"), frequency=1, batch_size=5, workers=0)
    got = evaluate_zeroshot(OneHot(), tok, fakes.to_tensor, cfg, 1, 1, CPU, "fp32", World())
    assert got == {"imagenet-zeroshot-val-top1": 1.0, "imagenet-zeroshot-val-top5": 1.0,
                   "imagenetv2-zeroshot-val-top1": pytest.approx(11 / 12), "imagenetv2-zeroshot-val-top5": 1.0}


def test_user_errors_are_one_line_value_errors(stripes, tmp_path):
    root, _, names, templates = stripes
    short = _write_lines(tmp_path / "short.txt", fakes.CLASSNAMES[:4])
    bad_t = _write_lines(tmp_path / "bad_t.txt", ["a photo of {c}"])
    no_slot = _write_lines(tmp_path / "no_slot.txt", ["a photo"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "v2" / "n0001").mkdir(parents=True)
    cases = {
        "no such directory": ZeroShotCfg(data=str(tmp_path / "missing")),
        "4 names for the 6 class folders": ZeroShotCfg(data=str(root / "data"), classnames=short),
        "no class folders": ZeroShotCfg(data=str(tmp_path / "empty")),
        "must contain one {}": ZeroShotCfg(data=str(root / "data"), templates=bad_t),
        "must contain one {} ": ZeroShotCfg(data=str(root / "data"), templates=no_slot),
        "--zeroshot-classnames": ZeroShotCfg(data=str(root / "data"), classnames=str(tmp_path / "nofile")),
        "need --zeroshot-data": ZeroShotCfg(classnames=names),
        "6 class folders, ImageNet has 1000": ZeroShotCfg(imagenet_val=str(root / "data")),
        "must be named 0..999": ZeroShotCfg(imagenet_v2=str(tmp_path / "v2")),
    }
    for want, cfg in cases.items():
        with pytest.raises(ValueError) as e:
            build_sets(cfg)
        assert want.strip() in str(e.value) and "\n" not in str(e.value), (want, str(e.value))


def test_demo_zeroshot_folder_with_a_real_tiny_model(tmp_path):
    """The demo's labelled folder through open_clip's tiny model and tokenizer; top-1 equals
    the per-image argmax computed here from the model's own encoders."""
    import open_clip
    import open_clip_train.models  # noqa: F401  registers the tiny configs
    from open_clip_train.demo_data import generate_zeroshot

    root = generate_zeroshot(tmp_path / "zs", by="colour", per_class=3, image_size=64, seed=0)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-convnext-cliptext")
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-convnext-cliptext")
    cfg = ZeroShotCfg(data=str(root), classnames=str(root / "classnames.txt"), templates=str(root / "templates.txt"),
                      frequency=1, batch_size=64, workers=0)
    got = evaluate_zeroshot(model, tokenizer, preprocess, cfg, 1, 1, CPU, "fp32", World())

    names = (root / "classnames.txt").read_text().split()
    templates = (root / "templates.txt").read_text().splitlines()
    with torch.no_grad():
        w = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])), dim=-1)
                                     .mean(0), dim=0) for c in names])
        files = [(p, k) for k, c in enumerate(names) for p in sorted((root / c).glob("*.jpg"))]
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in files])
        pred = (F.normalize(model.encode_image(x), dim=-1) @ w.T).argsort(dim=1, descending=True)
    labels = torch.tensor([k for _, k in files])
    assert len(files) == 24 and len(names) == 8
    assert got["zeroshot-zs-top1"] == pytest.approx((pred[:, 0] == labels).double().mean().item())
    assert got["zeroshot-zs-top5"] == pytest.approx((pred[:, :5] == labels[:, None]).any(1).double().mean().item())


WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    sys.path.insert(0, os.environ["FAKES_DIR"])
    import zeroshot_fakes as fakes
    from open_clip_train import distributed as dist_env
    from open_clip_train.zeroshot import ZeroShotCfg, evaluate_zeroshot

    world = dist_env.world_from_env()
    dist_env.init(world, torch.device("cpu"))
    cfg = ZeroShotCfg(data=sys.argv[1], classnames=sys.argv[2], templates=sys.argv[3], frequency=1,
                      batch_size=4, workers=0)
    got = evaluate_zeroshot(fakes.StripeModel(), fakes.tokenize, fakes.to_tensor, cfg, 1, 1,
                            torch.device("cpu"), "fp32", world)
    with open(os.path.join(sys.argv[4], f"rank{world.rank}.json"), "w") as f:
        json.dump(got, f)
    dist_env.close()
''')


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_share_the_work_and_agree_with_one_process(stripes, tmp_path, nproc):
    """The classes and images are split over ranks (40 images, 6 classes: uneven shards for 3)."""
    root, samples, names, templates = stripes
    one = evaluate_zeroshot(fakes.StripeModel(), fakes.tokenize, fakes.to_tensor, _cfg(root, names, templates),
                            1, 1, CPU, "fp32", World())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(nproc, script, [root / "data", names, templates, tmp_path], tmp_path, FAKES_DIR=Path(__file__).parent)
    for r in range(nproc):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == one
