"""Zero-shot in the trainer: --zeroshot-data / --imagenet-val reach results.jsonl under upstream's
keys, at --zeroshot-frequency, with the values the evaluator gives the saved weights; bad flags
are one-line errors before any work."""
import json

import pytest
import torch

import open_clip_train.models  # noqa: F401  registers the tiny configs
from open_clip_train.demo_data import generate_zeroshot
from open_clip_train.distributed import World
from open_clip_train.main import main
from open_clip_train.models import create_model, get_preprocess, get_tokenizer
from open_clip_train.zeroshot import ZeroShotCfg, evaluate_zeroshot

MODEL = "tiny-convnext-cliptext"
BASE = ["--model", MODEL, "--dataset-type", "synthetic", "--train-num-samples", "4", "--batch-size", "2",
        "--precision", "fp32", "--workers", "0", "--warmup", "1", "--lr", "1e-3", "--seed", "0"]


def _rows(run):
    return [json.loads(line) for line in (run / "checkpoints" / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_zeroshot(tmp_path_factory.mktemp("zs") / "shapes", by="colour", per_class=2, image_size=32, seed=0)


def test_zeroshot_data_rows_at_frequency_match_the_checkpoint(tmp_path, shapes):
    code = main(BASE + ["--epochs", "3", "--val-at-start", "--zeroshot-frequency", "2", "--zeroshot-data", str(shapes),
                        "--zeroshot-classnames", str(shapes / "classnames.txt"),
                        "--zeroshot-templates", str(shapes / "templates.txt"), "--zeroshot-name", "demo",
                        "--log-dir", str(tmp_path), "--name", "zs"])
    assert code == 0
    rows = _rows(tmp_path / "zs")
    assert [r["epoch"] for r in rows] == [0, 2, 3]  # start, the frequency, the last epoch
    assert all({"zeroshot-demo-top1", "zeroshot-demo-top5"} <= set(r) for r in rows)
    model, _ = create_model(MODEL, precision="fp32")
    ck = torch.load(tmp_path / "zs" / "checkpoints" / "epoch_3.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ck["state_dict"])
    cfg = ZeroShotCfg(data=str(shapes), classnames=str(shapes / "classnames.txt"),
                      templates=str(shapes / "templates.txt"), name="demo", frequency=1, batch_size=2, workers=0)
    want = evaluate_zeroshot(model, get_tokenizer(MODEL), get_preprocess(model, is_train=False), cfg, 3, 3,
                             torch.device("cpu"), "fp32", World())
    assert rows[-1]["zeroshot-demo-top1"] == pytest.approx(want["zeroshot-demo-top1"], abs=1e-12)
    assert rows[-1]["zeroshot-demo-top5"] == pytest.approx(want["zeroshot-demo-top5"], abs=1e-12)


def test_imagenet_val_keys(tmp_path, shapes, monkeypatch):
    """--imagenet-val with upstream's keys (ImageNet's 1000 names shrunk to this folder's classes)."""
    import open_clip

    names = (shapes / "classnames.txt").read_text().split()
    monkeypatch.setattr(open_clip, "IMAGENET_CLASSNAMES", names)
    monkeypatch.setattr(open_clip, "OPENAI_IMAGENET_TEMPLATES", ["a photo of a {}."])
    monkeypatch.setattr("open_clip_train.zeroshot.IMAGENET_CLASSES", len(names))
    code = main(BASE + ["--epochs", "1", "--zeroshot-frequency", "1", "--imagenet-val", str(shapes),
                        "--log-dir", str(tmp_path), "--name", "in"])
    assert code == 0
    (row,) = _rows(tmp_path / "in")
    assert row["epoch"] == 1 and {"imagenet-zeroshot-val-top1", "imagenet-zeroshot-val-top5"} <= set(row)
    assert 0 <= row["imagenet-zeroshot-val-top1"] <= row["imagenet-zeroshot-val-top5"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["--zeroshot-classnames", "x.txt"], "need --zeroshot-data DIR"),
    (["--zeroshot-data", "/nonexistent/zs"], "--zeroshot-data /nonexistent/zs: no such directory"),
    (["--imagenet-val", "/nonexistent/in"], "--imagenet-val /nonexistent/in: no such directory"),
])
def test_bad_zeroshot_flags_are_one_line_errors(tmp_path, capfd, extra, message):
    code = main(BASE + ["--epochs", "1", "--log-dir", str(tmp_path), "--name", "bad"] + extra)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "bad").exists()


def test_compare_and_results_table_show_zeroshot_columns(tmp_path, capsys):
    from open_clip_train import results_table
    from open_clip_train.compare.cli import main as compare_main

    runs = []
    for name, rows in (("with_zs", [{"epoch": 1, "zeroshot-demo-top1": 0.25, "zeroshot-demo-top5": 0.5},
                                    {"epoch": 2, "coco_i2t_R@1": 0.1, "imagenet-zeroshot-val-top1": 0.125,
                                     "zeroshot-demo-top1": 0.375}]),
                       ("without", [{"epoch": 1, "coco_i2t_R@1": 0.1}])):
        path = tmp_path / name / "checkpoints" / "results.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(tmp_path / name)
    assert compare_main([str(r) for r in runs]) == 0
    out = capsys.readouterr().out
    section = out.split("## Zero-shot classification")[1].split("##")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| run | epoch | imagenet-zeroshot-val-top1 | zeroshot-demo-top1 |"
    assert lines[2] == "| with_zs | 2 | 12.50% | 37.50% |"
    assert lines[3].startswith("| without | (no zero-shot results) |")
    assert results_table.main([str(runs[0])]) == 0
    out = capsys.readouterr().out
    assert "| 1 | - | 25.0% | 50.0% |" in out and "| 2 | 12.5% | 37.5% | - |" in out
