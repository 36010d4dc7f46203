"""End-to-end runs of `main([...])` on the tiny demo data, with assertions on everything a run
leaves behind: out.log, params.txt, provenance.json, checkpoints and results.jsonl.

The main run (module fixture, ~30 s on 2 cores) trains tiny-convnext-cliptext for 3 epochs of
10 steps with the image tower locked for epoch 0 and unlocked at epoch 1. Its validation set is
the 32 training images, so that a few dozen steps are enough to show learning well above chance.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from open_clip_train import trainer as trainer_module
from open_clip_train.demo_data import generate
from open_clip_train.main import main
from open_clip_train.models import create_model
from open_clip_train.params import build_parser

MODEL = "tiny-convnext-cliptext"
EPOCHS = 3
NUM_TRAIN, CAPTIONS = 32, 5
RECALLS = ("R@1", "R@5", "R@10")
COCO_KEYS = [f"coco_{d}_{m}" for d in ("i2t", "t2i") for m in (*RECALLS, "median_rank", "mean_rank")]
UPSTREAM_KEYS = [f"{d}_{m}" for d in ("image_to_text", "text_to_image") for m in (*RECALLS, "median_rank", "mean_rank")]
RESULT_KEYS = {"epoch", "num_samples", *COCO_KEYS, *UPSTREAM_KEYS, "clip_val_loss"}
TRAINABLE_RE = re.compile(r"trainable params \((?P<when>[^)]+)\): visual=(?P<visual>\d+), text=(?P<text>\d+), "
                          r"total=(?P<total>\d+)$")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), num_train=NUM_TRAIN, num_val=8, image_size=32, seed=0)


def run_args(demo, logs, name, *extra, train=True, val=None):
    args = ["--model", MODEL, "--dataset-type", "coco", "--batch-size", "16", "--lr", "1e-3", "--warmup", "3",
            "--workers", "0", "--precision", "fp32", "--no-augment", "--seed", "0",
            "--log-dir", str(logs), "--name", name]
    if train:
        args += ["--train-data", str(demo.train_annotations)]
    args += ["--val-data", str(val or demo.val_annotations)]
    return args + [str(x) for x in extra]


@pytest.fixture(scope="module")
def run(demo, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    argv = run_args(demo, logs, "e2e", "--epochs", EPOCHS, "--lock-image", "--unfreeze-image-at-epoch", 1,
                    "--val-at-start", "--log-every-n-steps", 5, val=demo.train_annotations)
    assert main(argv) == 0
    return logs / "e2e", argv


def messages(log: Path):
    """out.log messages without the time/level prefix."""
    return [line.split(" | ", 2)[-1] for line in log.read_text().splitlines()]


def tower_sizes():
    model, _ = create_model(MODEL, device="meta")
    sizes = {"visual": 0, "head": 0, "text": 0, "shared": 0}
    for n, p in model.named_parameters():
        key = ("head" if n.startswith("visual.head.") else "visual") if n.startswith("visual.") else (
            "shared" if n == "logit_scale" else "text")
        sizes[key] += p.numel()
    sizes["visual"] += sizes["head"]
    return sizes


def test_run_writes_every_output(run):
    root, argv = run
    assert (root / "out.log").is_file() and (root / "params.txt").is_file()
    ckpts = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert ckpts == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "results.jsonl"]
    prov = json.loads((root / "provenance.json").read_text())
    assert prov["argv"] == argv
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0] or prov["packages"]["torch"] == torch.__version__
    assert {"git_sha", "python", "host", "started"} <= set(prov)


def test_trainable_lines_at_init_and_at_the_unlock(run):
    msgs = messages(run[0] / "out.log")
    found = [(m.group("when"), int(m["visual"]), int(m["text"]), int(m["total"]))
             for m in map(TRAINABLE_RE.match, msgs) if m]
    sizes = tower_sizes()
    # locked trunk: only the attention-pool head of the image tower trains; then the whole tower
    assert found == [
        ("INIT", sizes["head"], sizes["text"], sizes["head"] + sizes["text"] + sizes["shared"]),
        ("epoch 1", sizes["visual"], sizes["text"], sizes["visual"] + sizes["text"] + sizes["shared"]),
    ]
    assert found[1][1] > found[0][1]
    unlock = msgs.index(next(m for m in msgs if m.startswith("unlock at epoch 1: image")))
    assert unlock < msgs.index(next(m for m in msgs if m.startswith("trainable params (epoch 1)")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_host_memory_retention_starts_once_the_steps_settle(run):
    msgs = messages(run[0] / "out.log")
    alloc = [i for i, m in enumerate(msgs) if m.startswith("host allocator: glibc")]
    decided = next(i for i, m in enumerate(msgs) if m.startswith("image trunk fully frozen: running it eagerly"))
    assert len(alloc) == 1 and alloc[0] > decided  # after the timed eager steps, not before the first


def group_tables(msgs):
    """Each param-group table in the log as {group: (#params, lr scale, wd)}."""
    tables = []
    for i, m in enumerate(msgs):
        if m.startswith("param group"):
            rows = {}
            for row in msgs[i + 1:]:
                parts = row.split()
                if len(parts) != 4 or not re.fullmatch(r"[\d,]+", parts[1]):
                    break
                rows[parts[0]] = (int(parts[1].replace(",", "")), float(parts[2]), float(parts[3]))
            tables.append(rows)
    return tables


def test_param_group_tables_cover_the_trainable_params(run):
    msgs = messages(run[0] / "out.log")
    totals = [int(m["total"]) for m in map(TRAINABLE_RE.match, msgs) if m]
    tables = group_tables(msgs)
    assert [sorted(t) for t in tables] == [
        ["base", "base/no_wd"],
        ["base", "base/no_wd", "unlock_image@1/x0.1", "unlock_image@1/x0.1/no_wd"],
    ]
    for table, total in zip(tables, totals):
        assert sum(n for n, _, _ in table.values()) == total
    assert tables[1]["unlock_image@1/x0.1"][1:] == (0.1, 0.2)  # --unfreeze-new-lr-scale default, --wd default
    assert tables[1]["unlock_image@1/x0.1/no_wd"][2] == 0.0


def test_params_txt_is_sorted_and_lists_every_flag(run):
    lines = (run[0] / "params.txt").read_text().splitlines()
    names = [line.split(": ", 1)[0] for line in lines]
    assert names == sorted(names)
    assert all(re.fullmatch(r"[a-z0-9_]+: .*", line) for line in lines)
    values = dict(line.split(": ", 1) for line in lines)
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests <= set(values)
    assert values["epochs"] == str(EPOCHS) and values["lock_image"] == "True"
    assert values["unfreeze_image_at_epoch"] == "1" and values["name"] == "e2e"
    assert values["world_size"] == "1" and values["device"] == "cpu"


def test_results_rows_per_evaluation(run):
    rows = [json.loads(line) for line in (run[0] / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]  # --val-at-start, then every epoch
    for r in rows:
        assert RESULT_KEYS <= set(r)
        assert r["num_samples"] == NUM_TRAIN * CAPTIONS and r["num_images"] == NUM_TRAIN
        for d in ("coco_i2t", "coco_t2i", "image_to_text", "text_to_image"):
            recalls = [r[f"{d}_{k}"] for k in RECALLS]
            assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1
            assert r[f"{d}_median_rank"] >= 1 and r[f"{d}_mean_rank"] >= 1
        assert r["clip_val_loss"] > 0


def test_checkpoints_load_weights_only_with_upstream_keys(run):
    root = run[0]
    fresh, _ = create_model(MODEL)
    states = {}
    for epoch in range(1, EPOCHS + 1):
        state = torch.load(root / "checkpoints" / f"epoch_{epoch}.pt", map_location="cpu", weights_only=True)
        assert {"epoch", "name", "state_dict", "optimizer"} <= set(state)
        assert state["epoch"] == epoch and state["name"] == "e2e"
        fresh.load_state_dict(state["state_dict"], strict=True)
        groups = [g["name"] for g in state["param_groups"]]
        assert len(state["optimizer"]["param_groups"]) == len(groups) == (2 if epoch == 1 else 4)
        states[epoch] = state["state_dict"]
    # the trunk kept its initial weights while locked (epoch 0), then trained after the unlock
    torch.manual_seed(0)
    init, _ = create_model(MODEL)
    trunk = [k for k in states[1] if k.startswith("visual.trunk.") and states[1][k].is_floating_point()]
    assert trunk and all(torch.equal(states[1][k], init.state_dict()[k]) for k in trunk)
    assert not torch.equal(states[1]["visual.head.pool.qkv.weight"], init.state_dict()["visual.head.pool.qkv.weight"])
    assert sum(not torch.equal(states[3][k], states[1][k]) for k in trunk) > len(trunk) // 2


def test_loss_decreases_and_retrieval_beats_chance(run):
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+)", (run[0] / "out.log").read_text())]
    assert len(losses) == EPOCHS * 2  # 10 steps per epoch, logged every 5
    assert losses[-1] < losses[0] - 0.5, losses
    last = json.loads((run[0] / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    chance_t2i_mean_rank = (NUM_TRAIN + 1) / 2
    assert last["coco_t2i_mean_rank"] < 0.7 * chance_t2i_mean_rank
    assert last["coco_t2i_R@5"] > 2 * 5 / NUM_TRAIN
    assert last["coco_i2t_R@5"] > 2 * 5 * CAPTIONS / (NUM_TRAIN * CAPTIONS)


def metrics_rows(root: Path):
    return [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_has_the_numbers_of_each_train_line(run):
    root = run[0]
    rows = metrics_rows(root)
    lines = [m for m in messages(root / "out.log") if m.startswith("Train Epoch:")]
    assert len(rows) == len(lines) == EPOCHS * 2
    assert [(r["epoch"], r["step"], r["epoch_step"]) for r in rows] == [
        (e, 10 * e + k, k) for e in range(EPOCHS) for k in (5, 10)]
    found = {m.group("when"): {k: int(m[k]) for k in ("visual", "text", "total")}
             for m in map(TRAINABLE_RE.match, messages(root / "out.log")) if m}
    for r, line in zip(rows, lines):
        assert line.startswith(f"Train Epoch: {r['epoch']} [{r['samples']}/{r['samples_per_epoch']} ")
        assert f"] step {r['step']} " in line
        assert f"Contrastive_loss: {r['losses']['contrastive_loss']:#.5g}" in line and list(r["losses"]) == [
            "contrastive_loss"]
        assert "LR: " + " ".join(f"{g}={lr:.3e}" for g, lr in r["lr"].items()) + " Logit" in line
        assert f"{r['samples_per_second']:#g}/s" in line
        assert r["trainable"] == found["INIT" if r["epoch"] == 0 else "epoch 1"]
    assert list(rows[0]["lr"]) == ["base", "base/no_wd"]
    assert list(rows[-1]["lr"]) == ["base", "base/no_wd", "unlock_image@1/x0.1", "unlock_image@1/x0.1/no_wd"]


def test_compare_reads_the_run_directory(run, tmp_path, capsys):
    """The compare tool on the run the trainer wrote: its loss curve comes from metrics.jsonl
    (full precision), and a run without that file still gets one from out.log."""
    import shutil

    from open_clip_train.compare import load_run, main as compare

    root = run[0]
    rows = metrics_rows(root)
    last = json.loads((root / "checkpoints" / "results.jsonl").read_text().splitlines()[-1])
    loaded = load_run(root, "e2e")
    assert [(p.epoch, p.step, p.samples) for p in loaded.log.points] == [(r["epoch"], r["step"], r["samples"])
                                                                          for r in rows]
    assert [p.losses for p in loaded.log.points] == [r["losses"] for r in rows]
    assert loaded.unlock_epochs == {1: ["image"]}
    assert loaded.protocols["coco"].last.epoch == EPOCHS
    assert loaded.protocols["coco"].last.recall["t2i_r5"] == last["coco_t2i_R@5"]

    old = tmp_path / "old_run"  # as written before metrics.jsonl existed
    shutil.copytree(root, old, ignore=shutil.ignore_patterns("*.pt", "metrics.jsonl"))
    from_log = load_run(old, "old").log.points
    assert [p.step for p in from_log] == [r["step"] for r in rows]
    assert [p.losses["contrastive_loss"] for p in from_log] == [
        float(f"{r['losses']['contrastive_loss']:#.5g}") for r in rows]

    png, md = tmp_path / "curves.png", tmp_path / "report.md"
    assert compare([str(root), "--plot", str(png), "--out", str(md)]) == 0
    out = capsys.readouterr().out
    config_row = next(line for line in out.splitlines() if line.startswith("| e2e | " + MODEL))
    assert "image locked, unlock all groups at epoch 1; text trainable; new lr x0.1" in config_row
    init = next(m for m in map(TRAINABLE_RE.match, messages(root / "out.log")) if m)
    assert f"{int(init['total']):,} ({int(init['visual']):,} / {int(init['text']):,})" in config_row
    i2t = "/".join(f"{100 * last[f'coco_i2t_R@{k}']:.2f}%" for k in (1, 5, 10))
    assert any(line.startswith(f"| e2e | {EPOCHS} | {i2t} |") for line in out.splitlines())
    assert md.read_text() == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt2_run_end_to_end(demo, tmp_path, gpt2_tokenizer_dir):
    argv = run_args(demo, tmp_path, "gpt2", "--epochs", 1, "--train-num-samples", 32,
                    "--text-tokenizer", gpt2_tokenizer_dir, "--lock-text", "--lock-text-unlocked-layers", 1)
    argv[argv.index(MODEL)] = "tiny-convnext-gpt2"
    assert main(argv) == 0
    root = tmp_path / "gpt2"
    (row,) = [json.loads(line) for line in (root / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert RESULT_KEYS <= set(row) and row["epoch"] == 1 and row["num_samples"] == 8 * CAPTIONS
    state = torch.load(root / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert any(k.startswith("text.transformer.h.") for k in state["state_dict"])
    trainable = [m for m in map(TRAINABLE_RE.match, messages(root / "out.log")) if m]
    assert trainable[0]["when"] == "INIT" and 0 < int(trainable[0]["text"])
    assert f"text_tokenizer: {gpt2_tokenizer_dir}" in (root / "params.txt").read_text()


def write_tsv(path: Path, ann_file: Path, image_dir: Path) -> int:
    data = json.loads(ann_file.read_text())
    files = {img["id"]: image_dir / img["file_name"] for img in data["images"]}
    rows = [f"{files[a['image_id']]}\t{a['caption']}" for a in data["annotations"]]
    path.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return len(rows)


def test_csv_run_end_to_end(demo, tmp_path):
    n_train = write_tsv(tmp_path / "train.tsv", demo.train_annotations, demo.train_images)
    n_val = write_tsv(tmp_path / "val.tsv", demo.val_annotations, demo.val_images)
    argv = ["--model", MODEL, "--dataset-type", "csv", "--train-data", tmp_path / "train.tsv",
            "--val-data", tmp_path / "val.tsv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--batch-size", 16, "--train-num-samples", 32, "--epochs", 1, "--lr", "1e-3", "--warmup", 1,
            "--workers", 0, "--precision", "fp32", "--log-dir", tmp_path / "logs", "--name", "csv"]
    assert main([str(a) for a in argv]) == 0
    root = tmp_path / "logs" / "csv"
    (row,) = [json.loads(line) for line in (root / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert n_train == NUM_TRAIN * CAPTIONS
    assert row["num_samples"] == n_val and row["num_images"] == 8  # val rows regrouped by image
    assert "Train Epoch: 0 [32/32 (100%)]" in (root / "out.log").read_text()


def test_eval_only_run_with_log_dir_none_writes_nothing(demo, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    argv = run_args(demo, "none", "x", train=False)
    assert main(argv) == 0
    assert list(tmp_path.iterdir()) == []
    err = capfd.readouterr().err
    assert "Eval Epoch: 0 coco_i2t_R@1:" in err


# ------------------------------------------------------------------------------------ user errors


def _case(*extra, model=MODEL, train=True):
    return dict(extra=[str(x) for x in extra], model=model, train=train)


USER_ERRORS = {
    "unknown model": (_case(model="tiny-convnext-cliptxt"),
                      "unknown model 'tiny-convnext-cliptxt'. Did you mean: tiny-convnext-cliptext"),
    "unknown model, dry run": (_case("--dry-run", model="tiny-convnext-cliptxt"), "Did you mean: tiny-convnext-cliptext"),
    "unlock without lock": (_case("--unfreeze-image-at-epoch", 1), "the image tower is not locked"),
    "lock pattern matches nothing": (_case("--lock-pattern", r"^nothing\."), "matches no parameter"),
    "existing experiment": (_case(), "already exists"),
    "missing train file": (_case("--train-data", "/nonexistent/captions_train2017.json"), "no such file"),
    "missing val file": (_case("--val-data", "/nonexistent/captions_val2017.json"), "no such file"),
    "unlock beyond the run": (_case("--lock-image", "--unfreeze-image-at-epoch", 5), "beyond the run"),
    "gpt2 without tokenizer": (_case(model="tiny-convnext-gpt2"), "--text-tokenizer"),
    "missing resume checkpoint": (_case("--resume", "/nonexistent/epoch_3.pt"), "no such checkpoint"),
    "no data at all": (_case(train=False, model=MODEL) | {"no_val": True}, "nothing to do"),
    "bad batch size": (_case("--batch-size", 0), "batch_size >= 1"),
    "bad flag value": (_case("--epochs", "three"), "invalid int value"),
    "missing pretrained": (_case("--pretrained", "/nonexistent/w.pt"), "--pretrained /nonexistent/w.pt: no such file"),
    "missing teacher": (_case("--distill", "--teacher-model", MODEL, "--teacher-pretrained", "/nonexistent/t.pt"),
                        "--teacher-pretrained /nonexistent/t.pt: no such file"),
    "teacher without --distill": (_case("--teacher-model", MODEL), "given without --distill"),
    "headalign without pretrained": (_case("--headalign"), "--headalign needs --pretrained"),
    "bad fraction": (_case("--max-bad-samples-fraction", 2), "must be a fraction in [0, 1]"),
    "resume from another architecture": (_case("--resume", "{other_arch}"),
                                         "(saved from model 'tiny-convnext-cliptext-linear') does not fit this model: "
                                         "missing visual.head.pool."),
    "teacher of another architecture": (_case("--distill", "--teacher-model", MODEL, "--teacher-pretrained",
                                              "{other_arch}"), "does not fit this model: missing visual.head.pool."),
    "pickled checkpoint": (_case("--resume", "{pickled}"), "holds pickled objects"),
    "unknown flag": (_case("--lock-imagex"), "did you mean --lock-image"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS), ids=list(USER_ERRORS))
def test_user_errors_are_one_line_and_exit_2(case, demo, tmp_path, monkeypatch, capfd):
    spec, expected = USER_ERRORS[case]
    logs = tmp_path / "logs"
    existing = logs / "run" / "out.log"
    if case == "existing experiment":
        existing.parent.mkdir(parents=True)
        existing.write_text("earlier run\n")

    def no_data(*a, **k):
        raise AssertionError("data was read before the user error was found")

    monkeypatch.setattr(trainer_module, "get_data", no_data)
    argv = run_args(demo, logs, "run", "--epochs", 2, train=spec["train"])
    argv[argv.index(MODEL)] = spec["model"]
    if spec.get("no_val"):
        i = argv.index("--val-data")
        del argv[i:i + 2]
    files = {"other_arch": tmp_path / "other.pt", "pickled": tmp_path / "pickled.pt"}
    if any("{" in x for x in spec["extra"]):
        other, _ = create_model("tiny-convnext-cliptext-linear", device="cpu")
        torch.save({"state_dict": other.state_dict(), "model": "tiny-convnext-cliptext-linear"}, files["other_arch"])
        torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, files["pickled"])
    argv += [x.format(**files) for x in spec["extra"]]  # later flags win over run_args' defaults
    capfd.readouterr()
    assert main(argv) == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    if case == "existing experiment":
        assert existing.read_text() == "earlier run\n" and sorted(p.name for p in (logs / "run").iterdir()) == ["out.log"]
    else:
        assert not logs.exists()  # nothing created before the error


def test_half_set_distributed_env_is_a_user_error(demo, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(run_args(demo, tmp_path / "logs", "run", "--epochs", 1)) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: half-set distributed environment")


def test_help_through_main_returns_0(capsys):
    assert main(["--help"]) == 0
    assert "--unfreeze-image-at-epoch" in capsys.readouterr().out
