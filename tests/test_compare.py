"""`python -m open_clip_train.compare`: run directories in upstream's formats (and ours) become
markdown tables with the right values, freeze strategies in words, last vs best epochs, sorting,
warnings for broken runs, and a PNG of the curves."""
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from open_clip_train.compare import freeze_in_words, loss_curve, main, parse_log, parse_params, short_names

TS = "2026-11-22,05:20:28 | INFO | "


# ---------------------------------------------------------------------------------------------
# fixture runs, written the way upstream and our trainer write them


def write_params(root: Path, settings: Dict) -> None:
    """As upstream main.py: `f"{name}: {val}\\n"` for sorted(vars(args))."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.txt").write_text("".join(f"{k}: {settings[k]}\n" for k in sorted(settings)))


UPSTREAM_DEFAULTS = dict(
    accum_freq=1, batch_size=256, distill=False, distill_model=None, distill_pretrained=None, epochs=3,
    lock_image=False, lock_image_unlocked_groups=0, lock_image_freeze_bn_stats=False, lock_text=False,
    lock_text_unlocked_layers=0, lock_text_freeze_layer_norm=False, lr=0.0005, model="ViT-B-32", name="x",
    precision="amp", pretrained="", warmup=500, world_size=2, logs="./logs/", seed=0,
)
OURS_DEFAULTS = dict(
    UPSTREAM_DEFAULTS, unfreeze_image_at_epoch=None, unlocked_image_groups=None, unfreeze_text_at_epoch=None,
    unlocked_text_layers=None, unfreeze_new_lr_scale=0.1, unfreeze_warmup_steps=0, lock_pattern=[], lr_mult=[],
    pretrained_text_path=None,
)


def result_row(epoch: int, coco=None, pairwise=None, val_loss=2.5) -> Dict:
    """coco / pairwise: (i2t R@1, R@5, R@10, t2i R@1, R@5, R@10) as fractions."""
    row = {"epoch": epoch, "num_samples": 50}
    if coco is not None:
        for d, vals in (("i2t", coco[:3]), ("t2i", coco[3:])):
            row.update({f"coco_{d}_R@{k}": v for k, v in zip((1, 5, 10), vals)})
            row.update({f"coco_{d}_median_rank": 12.0, f"coco_{d}_mean_rank": 30.5})
    if pairwise is not None:
        for d, vals in (("image_to_text", pairwise[:3]), ("text_to_image", pairwise[3:])):
            row.update({f"{d}_R@{k}": v for k, v in zip((1, 5, 10), vals)})
            row.update({f"{d}_median_rank": 20.0, f"{d}_mean_rank": 40.0})
    row["clip_val_loss"] = val_loss
    return row


def write_results(path: Path, rows: List[Dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def upstream_train_line(epoch, samples, per_epoch, loss):
    # upstream train.py: samples right-aligned to the width of samples_per_epoch, loss "val (avg)"
    return (f"{TS}Train Epoch: {epoch} [{samples:>{len(str(per_epoch))}}/{per_epoch} "
            f"({100 * samples / per_epoch:.0f}%)] Data (t): 0.101 Batch (t): 0.512, 1000.00/s, 500.000/s/gpu "
            f"LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: {loss:#.5g} ({loss + 0.1:#.5g}) "
            f"Loss: {loss:#.5g} ({loss + 0.1:#.5g})\n")


def ours_train_line(epoch, done, total, step, loss, distill=None):
    extra = f" Distill_loss: {distill:#.5g}" if distill is not None else ""
    return (f"{TS}Train Epoch: {epoch} [{done}/{total} ({100 * done / total:.0f}%)] step {step} "
            f"Data (t): 0.009 Batch (t): 0.269, 237.752/s, 237.752/s/gpu LR: base=1.600e-03 base/no_wd=1.600e-03 "
            f"Logit Scale: 14.146 Contrastive_loss: {loss:.4f}{extra} ETA: 0:02:37\n")


@pytest.fixture()
def runs(tmp_path) -> Dict[str, Path]:
    out = {}

    # 1) upstream-only: results.jsonl in RUN/, pairwise keys only, upstream log lines, no INIT counts
    up = tmp_path / "upstream_vitb32"
    write_params(up, dict(UPSTREAM_DEFAULTS, name="upstream_vitb32"))  # global batch 256 x 2 x 1 = 512
    write_results(up / "results.jsonl", [
        result_row(1, pairwise=(0.10, 0.30, 0.40, 0.08, 0.28, 0.38)),
        result_row(2, pairwise=(0.15, 0.35, 0.45, 0.12, 0.33, 0.44)),
        result_row(3, pairwise=(0.14, 0.36, 0.47, 0.11, 0.34, 0.45), val_loss=2.25),
    ])
    (up / "out.log").write_text(
        f"{TS}Running with a single process. Device cuda:0.\n"
        + "".join(upstream_train_line(e, s, 10000, 5.0 - e - s / 10000) for e in range(3) for s in (512, 9728)))
    out["upstream"] = up

    # 2) ours: results in checkpoints/ (COCO + pairwise), INIT + unlock lines; best epoch 3, last epoch 4
    ours = tmp_path / "ours_gpt2_unf"
    write_params(ours, dict(
        OURS_DEFAULTS, name="ours_gpt2_unf", model="convnextv2_tiny_gpt2-512", lr=0.0007, epochs=4, warmup=2400,
        batch_size=192, world_size=2, accum_freq=1, lock_image=True, lock_text=True,
        unfreeze_image_at_epoch=3, unlocked_image_groups=4, unfreeze_text_at_epoch=2, unlocked_text_layers=6,
        pretrained_text_path="/weights/gpt2/model.safetensors"))
    write_results(ours / "checkpoints" / "results.jsonl", [
        result_row(1, coco=(0.05, 0.20, 0.30, 0.04, 0.21, 0.31), pairwise=(0.02, 0.08, 0.12, 0.02, 0.07, 0.11)),
        result_row(2, coco=(0.08, 0.28, 0.40, 0.06, 0.29, 0.41), pairwise=(0.03, 0.10, 0.15, 0.03, 0.09, 0.14)),
        result_row(3, coco=(0.0955, 0.3426, 0.4752, 0.0690, 0.3452, 0.4762),
                   pairwise=(0.04, 0.12, 0.18, 0.035, 0.11, 0.17)),
        result_row(4, coco=(0.0900, 0.3300, 0.4700, 0.0650, 0.3400, 0.4700),
                   pairwise=(0.05, 0.13, 0.19, 0.04, 0.12, 0.18), val_loss=2.9129),
    ])
    log = [f"{TS}trainable params (INIT): visual=2203904, text=819200, total=3023105\n"]
    step = 0
    for epoch in range(4):
        if epoch == 2:
            log.append(f"{TS}unlock at epoch 2: text (74 tensors)\n")
            log.append(f"{TS}trainable params (epoch 2): visual=2203904, text=43346432, total=45550337\n")
        if epoch == 3:
            log.append(f"{TS}unlock at epoch 3: image (40 tensors)\n")
            log.append(f"{TS}trainable params (epoch 3): visual=20000000, text=43346432, total=63346433\n")
        for done in (20, 40):
            step += 20
            log.append(ours_train_line(epoch, done * 384, 40 * 384, step, 4.0 - 0.1 * step / 20))
    (ours / "out.log").write_text("".join(log))
    out["ours"] = ours

    # 3) ours, distill, half-written last results line (killed while writing); text unlock of all layers
    half = tmp_path / "ours_distill_half"
    write_params(half, dict(
        OURS_DEFAULTS, name="ours_distill_half", model="convnext_base_w_absattn", lr=5e-4, epochs=20, warmup=1200,
        batch_size=96, world_size=4, lock_image=True, lock_text=True, distill=True, teacher_model="convnext_base_w",
        unfreeze_image_at_epoch=8, unlocked_image_groups=2, unfreeze_text_at_epoch=18, unfreeze_new_lr_scale=0.05))
    write_results(half / "checkpoints" / "results.jsonl", [
        result_row(1, coco=(0.12, 0.44, 0.58, 0.09, 0.45, 0.58), pairwise=(0.06, 0.2, 0.3, 0.05, 0.2, 0.3)),
        result_row(2, coco=(0.131, 0.4681, 0.603, 0.0974, 0.4861, 0.6084), pairwise=(0.07, 0.2, 0.3, 0.06, 0.2, 0.3)),
    ], tail='{"epoch": 3, "num_samples": 50, "coco_i2t_R@1": 0.1')
    (half / "out.log").write_text(
        f"{TS}trainable params (INIT): visual=3856000, text=0, total=3856001\n"
        + ours_train_line(0, 384, 3840, 1, 3.5, distill=1.25) + ours_train_line(0, 3840, 3840, 10, 3.0, distill=1.0))
    out["half"] = half

    # 4) ours, nothing locked, no results.jsonl at all (crashed before the first evaluation)
    nores = tmp_path / "ours_nofreeze_noresults"
    write_params(nores, dict(OURS_DEFAULTS, name="renamed_later", model="convnextv2_tiny_cliptext-512", lr=7e-4,
                             epochs=26, warmup=2200, batch_size=192, world_size=2, accum_freq=2))
    (nores / "checkpoints").mkdir()
    (nores / "out.log").write_text(
        f"{TS}trainable params (INIT): visual=30070400, text=125259008, total=155329409\n")
    out["nores"] = nores

    out["notarun"] = tmp_path / "notarun"
    out["notarun"].mkdir()
    (out["notarun"] / "README").write_text("not a run\n")
    return out


# ---------------------------------------------------------------------------------------------
# helpers to read the report back


def sections(report: str) -> Dict[str, List[str]]:
    out, current = {}, None
    for line in report.splitlines():
        if line.startswith("## "):
            current = line[3:]
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def table(lines: List[str]) -> Dict[str, Dict[str, str]]:
    """A section's markdown table -> {run name: {column: cell}} (first table in the section)."""
    rows = [ln for ln in lines if ln.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split(" | ")]
    assert rows[1].startswith("| ---")
    out = {}
    for ln in rows[2:]:
        cells = [c.strip() for c in ln.strip()[2:-2].split(" | ")]
        assert len(cells) == len(head), ln
        out[cells[0]] = dict(zip(head, cells))
    return out


def run_order(lines: List[str]) -> List[str]:
    return list(table(lines))


COCO = "COCO protocol (`coco_*` keys: every caption of an image counts as a match)"
PAIRWISE = "Pairwise (upstream) metrics; not comparable to COCO protocol"


def report_for(capsys, argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# the table


def test_table_values(runs, capsys):
    rc, out, err = report_for(capsys, [runs["upstream"], runs["ours"], runs["half"], runs["nores"]])
    assert rc == 0
    sec = sections(out)
    cfg = table(sec["Runs"])
    assert list(cfg) == ["upstream_vitb32", "ours_gpt2_unf", "ours_distill_half", "ours_nofreeze_noresults"]

    ours = cfg["ours_gpt2_unf"]
    assert ours["model"] == "convnextv2_tiny_gpt2-512"
    assert ours["text tower"] == "gpt2 (pretrained_text_path)"
    assert ours["freeze / unfreeze"] == (
        "image locked, unlock 4 groups at epoch 3; text locked, unlock 6 layers at epoch 2; new lr x0.1")
    assert ours["distill / headalign"] == "-"
    assert ours["lr / epochs"] == "7e-4 / 4"
    assert ours["warmup"] == "2400"
    assert ours["batch x world x accum = global"] == "192 x 2 x 1 = 384"
    assert ours["trainable @INIT: total (visual / text)"] == "3,023,105 (2,203,904 / 819,200)"

    up = cfg["upstream_vitb32"]
    assert up["text tower"] == "CLIP text"
    assert up["freeze / unfreeze"] == "nothing locked"
    assert up["lr / epochs"] == "5e-4 / 3"
    assert up["batch x world x accum = global"] == "256 x 2 x 1 = 512"
    assert up["trainable @INIT: total (visual / text)"] == "-"  # upstream logs no trainable counts

    half = cfg["ours_distill_half"]
    assert half["distill / headalign"] == "distill (teacher convnext_base_w)"
    assert half["freeze / unfreeze"] == (
        "image locked, unlock 2 groups at epoch 8; text locked, unlock all layers at epoch 18; new lr x0.05")
    assert half["batch x world x accum = global"] == "96 x 4 x 1 = 384"
    assert half["trainable @INIT: total (visual / text)"] == "3,856,001 (3,856,000 / 0)"

    nores = cfg["ours_nofreeze_noresults"]
    assert nores["text tower"] == "cliptext"
    assert nores["freeze / unfreeze"] == "nothing locked"
    assert nores["batch x world x accum = global"] == "192 x 2 x 2 = 768"
    assert nores["trainable @INIT: total (visual / text)"] == "155,329,409 (30,070,400 / 125,259,008)"

    # COCO protocol: last epoch 4 and best epoch 3 (mean of the R@1s) differ
    coco = table(sec[COCO])
    o = coco["ours_gpt2_unf"]
    assert o["last epoch"] == "4"
    assert o["I2T R@1/5/10"] == "9.00%/33.00%/47.00%"
    assert o["T2I R@1/5/10"] == "6.50%/34.00%/47.00%"
    assert o["best epoch"] == "3"
    assert o["I2T R@1/5/10 (best)"] == "9.55%/34.26%/47.52%"
    assert o["T2I R@1/5/10 (best)"] == "6.90%/34.52%/47.62%"
    assert o["clip_val_loss (last)"] == "2.9129"
    assert "mean of I2T R@1 and T2I R@1" in "\n".join(sec[COCO])  # the documented best key

    # the upstream run has no COCO numbers: said so, and its pairwise numbers are in their own section
    assert coco["upstream_vitb32"]["last epoch"] == "(n/a: upstream run, pairwise (upstream) metrics only)"
    pw = table(sec[PAIRWISE])
    u = pw["upstream_vitb32"]
    assert (u["last epoch"], u["best epoch"]) == ("3", "2")
    assert u["I2T R@1/5/10"] == "14.00%/36.00%/47.00%"
    assert u["T2I R@1/5/10 (best)"] == "12.00%/33.00%/44.00%"
    assert u["clip_val_loss (last)"] == "2.2500"
    # our runs show both protocols, never mixed: pairwise last epoch of ours is the pairwise value
    assert pw["ours_gpt2_unf"]["I2T R@1/5/10"] == "5.00%/13.00%/19.00%"

    # half-written last line: the run is reported up to its last complete line, with a note
    h = coco["ours_distill_half"]
    assert h["last epoch"] == "2 (see notes)"
    assert h["I2T R@1/5/10"] == "13.10%/46.81%/60.30%"
    # missing results.jsonl: a note row in both metric tables
    assert coco["ours_nofreeze_noresults"]["last epoch"] == "(no results.jsonl)"
    assert pw["ours_nofreeze_noresults"]["last epoch"] == "(no results.jsonl)"

    notes = "\n".join(sec["Notes"])
    assert "ours_distill_half: checkpoints/results.jsonl line 3 is half-written" in notes
    assert "ours_nofreeze_noresults: no results.jsonl" in notes
    assert "ours_nofreeze_noresults: params.txt name is 'renamed_later'" in notes
    # the same problems reach stderr as warnings
    assert "warning: ours_distill_half: checkpoints/results.jsonl line 3 is half-written" in err
    assert "warning: ours_nofreeze_noresults: no results.jsonl" in err


def test_sorting(runs, capsys):
    dirs = [runs["upstream"], runs["ours"], runs["half"], runs["nores"]]
    _, out, _ = report_for(capsys, dirs + ["--sort", "i2t_r1"])
    # COCO I2T R@1 at the last epoch, best first; runs without a COCO value last, in the given order
    expected = ["ours_distill_half", "ours_gpt2_unf", "upstream_vitb32", "ours_nofreeze_noresults"]
    assert run_order(sections(out)[COCO]) == expected
    assert run_order(sections(out)["Runs"]) == expected  # every table in one order
    assert out.startswith("# Run comparison (4 runs, sorted by i2t_r1)")

    _, out, _ = report_for(capsys, dirs + ["--sort", "name"])
    assert run_order(sections(out)["Runs"]) == sorted(["upstream_vitb32", "ours_gpt2_unf", "ours_distill_half",
                                                       "ours_nofreeze_noresults"])

    _, out, _ = report_for(capsys, dirs + ["--sort", "pw_t2i_r1"])
    assert run_order(sections(out)[PAIRWISE]) == [
        "upstream_vitb32", "ours_distill_half", "ours_gpt2_unf", "ours_nofreeze_noresults"]

    _, out, _ = report_for(capsys, dirs + ["--sort", "best_t2i_r1"])
    assert run_order(sections(out)[COCO])[:2] == ["ours_distill_half", "ours_gpt2_unf"]

    _, out, _ = report_for(capsys, dirs + ["--sort", "trainable"])
    assert run_order(sections(out)["Runs"]) == [
        "ours_gpt2_unf", "ours_distill_half", "ours_nofreeze_noresults", "upstream_vitb32"]

    rc, _, err = report_for(capsys, dirs + ["--sort", "no_such_column"])
    assert rc == 2 and "invalid choice" in err


def test_best_by_rsum(runs, capsys):
    # pairwise upstream: epoch 2 has the best mean R@1, epoch 3 the best sum of all six recalls
    _, out, _ = report_for(capsys, [runs["upstream"], "--best-by", "rsum"])
    assert table(sections(out)[PAIRWISE])["upstream_vitb32"]["best epoch"] == "3"
    assert "sum of I2T and T2I R@1/5/10" in out


def test_not_a_run(runs, tmp_path, capsys):
    rc, out, err = report_for(capsys, [runs["ours"], runs["notarun"], tmp_path / "missing"])
    assert rc == 0
    assert list(table(sections(out)["Runs"])) == ["ours_gpt2_unf"]
    assert f"warning: {runs['notarun']} is not a run directory" in err
    assert f"warning: {tmp_path / 'missing'} is not a run directory" in err
    assert "not a run directory" in "\n".join(sections(out)["Notes"])

    rc, out, err = report_for(capsys, [runs["notarun"], tmp_path / "missing"])
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: no run directory among")


def test_out_file_matches_stdout(runs, tmp_path, capsys):
    report = tmp_path / "report.md"
    rc, out, _ = report_for(capsys, [runs["ours"], runs["upstream"], "--out", report])
    assert rc == 0 and report.read_text() == out
    rc, _, err = report_for(capsys, [runs["ours"], "--out", tmp_path / "no" / "such" / "dir.md"])
    assert rc == 2 and err.startswith("error: cannot write --out")


def test_plot_writes_png(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "curves.png"
    rc, _, _ = report_for(capsys, [runs["upstream"], runs["ours"], runs["half"], runs["nores"], "--plot", png])
    assert rc == 0
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG"
        width, height = im.size
    assert 1000 <= width <= 4000 and 300 <= height <= 2000
    assert png.stat().st_size > 20_000  # curves were drawn, not an empty canvas


def test_plot_legend_names_drop_the_shared_prefix_and_suffix():
    seed = ["cnv2t_gpt2_lock_both_unf_img6_lr7e-4", "cnv2t_gpt2_lock_image_lr7e-4", "cnv2t_gpt2_full_ft_lr7e-4"]
    assert short_names(seed) == ["lock_both_unf_img6", "lock_image", "full_ft"]
    assert short_names(["runs/a", "runs/b"]) == ["a", "b"]
    assert short_names(["x_1", "x_1_y"]) == ["1", "1_y"]  # the cut stops at separators
    assert short_names(["ab", "abc"]) == ["ab", "abc"]  # no separator: full names
    assert short_names(["only_one_run"]) == ["only_one_run"]
    long = short_names(["a" * 20 + "_" + "b" * 20], width=28)[0]
    assert len(long) == 28 and long.startswith("a" * 13) and long.endswith("b" * 14)


def test_module_cli(runs):
    proc = subprocess.run([sys.executable, "-m", "open_clip_train.compare", str(runs["ours"]), "--sort", "t2i_r1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| ours_gpt2_unf | convnextv2_tiny_gpt2-512 |" in proc.stdout


# ---------------------------------------------------------------------------------------------
# parsing


def test_parse_params_reprs():
    p = parse_params("a: None\nb: True\nc: 0.0007\nd: ['x', 'y']\nmodel: ViT-B-32\npretrained: \n"
                     "path: /a/b.safetensors\nlr_mult: [('visual.head', 0.5)]\n")
    assert p == {"a": None, "b": True, "c": 0.0007, "d": ["x", "y"], "model": "ViT-B-32", "pretrained": "",
                 "path": "/a/b.safetensors", "lr_mult": [("visual.head", 0.5)]}


def test_parse_log_steps_upstream_and_ours():
    up = parse_log([upstream_train_line(e, s, 10000, 4.0) for e in range(2) for s in (512, 9728)])
    assert [p.step for p in up.points] == [None] * 4
    assert up.points[0].losses == {"contrastive_loss": 4.0, "loss": 4.0}  # the running average is not taken
    steps, series, spe = loss_curve(up.points, 512)  # 10000 // 512 = 19 steps per epoch
    assert spe == 19 and steps == [1, 19, 20, 38]
    assert set(series) == {"contrastive_loss"}  # upstream's total `Loss` equals its only term: drawn once

    ours = parse_log([
        f"{TS}trainable params (INIT): visual=1, text=2, total=4\n",
        f"{TS}trainable params (RESUME at epoch 1): visual=9, text=9, total=19\n",
        ours_train_line(0, 192, 384, 1, 4.2478, distill=0.5),
        f"{TS}unlock at epoch 1: image (40 tensors), text (12 tensors)\n",
        f"{TS}trainable params (epoch 1): visual=5, text=6, total=12\n",
        f"{TS}trainable params (INIT): visual=7, text=7, total=15\n",  # a resumed run's second start
        ours_train_line(1, 384, 384, 4, 3.9, distill=0.4),
        f"{TS}Train Epoch: 1 [19",  # half-written last line
    ])
    assert ours.init_counts == {"visual": 1, "text": 2, "total": 4}
    assert ours.unlock_epochs == {1: ["image", "text"]}
    assert [p.step for p in ours.points] == [1, 4]
    assert ours.points[0].losses == {"contrastive_loss": 4.2478, "distill_loss": 0.5}
    steps, series, _ = loss_curve(ours.points, 192)
    assert steps == [1, 4] and series["distill_loss"] == [0.5, 0.4]


# ---------------------------------------------------------------------------------------------
# the freeze strategy in words: the seed report's seven configurations


SEED_CONFIGS = [
    # tiny gpt2 nofreeze
    (dict(lock_image=False, lock_text=False, unfreeze_new_lr_scale=0.1, epochs=26),
     "nothing locked"),
    # tiny gpt2 unf35
    (dict(lock_image=True, lock_text=True, unfreeze_image_at_epoch=5, unlocked_image_groups=4,
          unfreeze_text_at_epoch=3, unlocked_text_layers=6, unfreeze_new_lr_scale=0.1, epochs=26),
     "image locked, unlock 4 groups at epoch 5; text locked, unlock 6 layers at epoch 3; new lr x0.1"),
    # tiny cliptext unfimg5
    (dict(lock_image=True, lock_text=False, unfreeze_image_at_epoch=5, unlocked_image_groups=4,
          unfreeze_new_lr_scale=0.1, epochs=26),
     "image locked, unlock 4 groups at epoch 5; text trainable; new lr x0.1"),
    # cnbw 3stage_preval
    (dict(lock_image=True, lock_text=True, unfreeze_image_at_epoch=3, unlocked_image_groups=2,
          unfreeze_text_at_epoch=8, unlocked_text_layers=None, unfreeze_new_lr_scale=0.2, epochs=10),
     "image locked, unlock 2 groups at epoch 3; text locked, unlock all layers at epoch 8; new lr x0.2"),
    # cnbw distill frozen
    (dict(lock_image=True, lock_text=True, unfreeze_image_at_epoch=None, unfreeze_text_at_epoch=None,
          unfreeze_new_lr_scale=0.1, epochs=20),
     "image and text locked, never unlocked"),
    # cnbw distill imgunf
    (dict(lock_image=True, lock_text=True, unfreeze_image_at_epoch=8, unlocked_image_groups=2,
          unfreeze_text_at_epoch=18, unfreeze_new_lr_scale=0.05, epochs=20),
     "image locked, unlock 2 groups at epoch 8; text locked, unlock all layers at epoch 18; new lr x0.05"),
    # cnbw headalign
    (dict(lock_image=True, lock_text=True, unfreeze_image_at_epoch=6, unlocked_image_groups=1,
          unfreeze_text_at_epoch=10, unfreeze_new_lr_scale=0.05, epochs=10),
     "image locked, unlock 1 group at epoch 6; text locked, unlock all layers at epoch 10 "
     "(never reached: the run has 10 epochs); new lr x0.05"),
]


@pytest.mark.parametrize("settings,words", SEED_CONFIGS, ids=[
    "tiny_nofreeze", "tiny_unf35", "tiny_cliptext_unfimg5", "cnbw_3stage", "cnbw_distill_frozen",
    "cnbw_distill_imgunf", "cnbw_headalign"])
def test_freeze_in_words_seed_configs(settings, words):
    assert freeze_in_words(settings) == words


def test_freeze_in_words_params_txt_strings_and_other_cases():
    # values as read from params.txt text; parse_params gives python values, raw strings also work
    raw = {"lock_image": "True", "lock_text": "False", "unfreeze_image_at_epoch": "None", "epochs": "5"}
    assert freeze_in_words(raw) == "image locked, never unlocked; text trainable"
    assert freeze_in_words({}) == "nothing locked"  # upstream defaults
    assert freeze_in_words(dict(lock_image=True, lock_image_unlocked_groups=2, lock_text=True,
                                lock_text_unlocked_layers=1)) == (
        "image locked except the last 2 groups, never unlocked further; "
        "text locked except the last 1 layer, never unlocked further")
    assert freeze_in_words(dict(lock_image=True, lock_text=True, unfreeze_text_at_epoch=2,
                                unfreeze_new_lr_scale=0.1, unfreeze_warmup_steps=50)) == (
        "image locked, never unlocked; text locked, unlock all layers at epoch 2; new lr x0.1 ramped over 50 steps")
    assert freeze_in_words(dict(lock_pattern=["logit_scale"])) == (
        "image and text not locked; also locked: params matching `logit_scale`")
