"""Our CLI must accept upstream open_clip_torch v3.3.0's flags with upstream's defaults.

Upstream's params.py is loaded by file path from the installed distribution (our
editable package of the same name shadows it on import).
"""
import argparse
import importlib.metadata
import importlib.util
import os

import pytest

from open_clip_train import params as ours

# The only intended differences in upstream flags' attributes.
EXTRA_CHOICES = {"dataset_type": {"coco", "msrvtt"}}


def _load_upstream():
    path = importlib.metadata.distribution("open_clip_torch").locate_file("open_clip_train/params.py")
    assert os.path.isfile(path), f"upstream params.py not found at {path}"
    spec = importlib.util.spec_from_file_location("_upstream_open_clip_params", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def upstream():
    return _load_upstream()


@pytest.fixture(scope="module")
def upstream_parser(upstream):
    captured = []
    original = argparse.ArgumentParser.parse_args

    def recording(self, *a, **kw):
        captured.append(self)
        return original(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", recording)
        upstream.parse_args([])
    assert len(captured) == 1
    return captured[0]


@pytest.fixture(scope="module")
def our_parser():
    return ours.build_parser()


def _option_actions(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_ours_is_not_upstream(upstream):
    assert os.path.realpath(ours.__file__) != os.path.realpath(upstream.__file__)


def test_upstream_has_many_flags(upstream_parser):
    # Guard against capturing the wrong parser.
    assert len(_option_actions(upstream_parser)) >= 80


def test_every_upstream_flag_matches(upstream_parser, our_parser):
    mismatches = []
    for up in _option_actions(upstream_parser):
        for opt in up.option_strings:
            mine = our_parser._option_string_actions.get(opt)
            if mine is None:
                mismatches.append(f"{opt}: missing")
                continue
            for attr in ("dest", "default", "type", "nargs", "const", "required"):
                if getattr(mine, attr) != getattr(up, attr):
                    mismatches.append(f"{opt}.{attr}: ours {getattr(mine, attr)!r} != {getattr(up, attr)!r}")
            if type(up.default) is not type(mine.default):
                mismatches.append(f"{opt}.default type: {type(mine.default)} != {type(up.default)}")
            up_choices = None if up.choices is None else list(up.choices)
            my_choices = None if mine.choices is None else list(mine.choices)
            if up_choices != my_choices:
                extra = EXTRA_CHOICES.get(up.dest)
                ok = (extra is not None and my_choices is not None
                      and my_choices[:len(up_choices)] == up_choices
                      and set(my_choices[len(up_choices):]) == extra)
                if not ok:
                    mismatches.append(f"{opt}.choices: ours {my_choices} != {up_choices}")
            up_cls, my_cls = type(up), type(mine)
            if up_cls.__module__.startswith("argparse"):
                if my_cls is not up_cls:
                    mismatches.append(f"{opt}.action: {my_cls.__name__} != {up_cls.__name__}")
            elif my_cls.__name__ != up_cls.__name__:  # upstream's custom ParseKwargs
                mismatches.append(f"{opt}.action: {my_cls.__name__} != {up_cls.__name__}")
    assert not mismatches, "\n".join(mismatches)


def test_parser_level_settings_match(upstream_parser, our_parser):
    assert our_parser.allow_abbrev == upstream_parser.allow_abbrev
    assert our_parser.prefix_chars == upstream_parser.prefix_chars


def test_flags_are_grouped(our_parser):
    titles = {g.title for g in our_parser._action_groups}
    for title in ("data", "model / weights", "optimisation", "schedule", "precision / performance",
                  "locking / freezing", "evaluation", "logging / outputs", "distributed", "distillation"):
        assert title in titles
    # Nothing but --help left in argparse's catch-all group.
    leftovers = [a.dest for a in our_parser._optionals._group_actions if a.dest != "help"]
    assert leftovers == []


UPSTREAM_ARGVS = [
    pytest.param([], id="defaults"),
    pytest.param(["--model", "ViT-B-32"], id="vit"),
    pytest.param(["--model", "ViT-B-16-SigLIP", "--lr", "1e-3"], id="vit-lr-given"),
    pytest.param(["--model", "convnext_base", "--beta1", "0.8"], id="convnext-lr-unset"),
    pytest.param(["--model", "vit_custom", "--opt", "timm/lamb", "--momentum", "0.9"], id="timm-opt"),
    pytest.param(
        [
            "--train-data", "a/{000..010}.tar::b/{000..004}.tar",
            "--train-data-upsampling-factors", "1::2",
            "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", "1000", "--batch-size", "128", "--workers", "2",
            "--epochs", "5", "--warmup", "200", "--lr-scheduler", "const-cooldown",
            "--epochs-cooldown", "1", "--lr-cooldown-end", "1e-6",
            "--wd", "0.1", "--eps", "1e-7", "--grad-clip-norm", "1.0", "--accum-freq", "2",
            "--precision", "amp_bf16", "--grad-checkpointing", "--torchcompile",
            "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25",
            "--image-interpolation", "bilinear", "--image-resize-mode", "squash",
            "--force-image-size", "224", "256", "--force-patch-dropout", "0.0",
            "--aug-cfg", "scale=(0.4, 1.0)", "color_jitter=0.4", "use_timm=True", "re_mode=pixel",
            "--lock-image", "--lock-image-unlocked-groups", "2", "--lock-text",
            "--lock-text-unlocked-layers", "3", "--lock-text-freeze-layer-norm",
            "--csv-separator", ",", "--csv-img-key", "img", "--csv-caption-key", "cap",
            "--logs", "/tmp/runs", "--name", "exp1", "--report-to", "tensorboard",
            "--save-frequency", "2", "--save-most-recent", "--delete-previous-checkpoint",
            "--resume", "latest", "--zeroshot-frequency", "1", "--imagenet-val", "/data/in1k",
            "--dist-url", "env://", "--dist-backend", "nccl", "--local-loss", "--gather-with-grad",
            "--siglip", "--distill-model", "ViT-L-14", "--distill-pretrained", "openai",
            "--remote-sync", "s3://bucket/x", "--remote-sync-protocol", "fsspec",
            "--seed", "7", "--log-every-n-steps", "10", "--coca-caption-loss-weight", "1.5",
        ],
        id="many-flags",
    ),
    pytest.param(["--lr-sched", "const", "--batch", "8"], id="abbreviations"),
]


@pytest.mark.parametrize("argv", UPSTREAM_ARGVS)
def test_namespace_matches_upstream(upstream, argv):
    theirs = vars(upstream.parse_args(list(argv)))
    mine = vars(ours.parse_args(list(argv)))
    missing = set(theirs) - set(mine)
    assert not missing
    diffs = {k: (mine[k], theirs[k]) for k in theirs if mine[k] != theirs[k] or type(mine[k]) is not type(theirs[k])}
    assert not diffs


def test_optimiser_defaults_rule():
    assert ours.get_default_params("ViT-B-32") == {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
    assert ours.get_default_params("hf-vit-tiny") == {"lr": 5e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
    assert ours.get_default_params("RN50") == {"lr": 5e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    args = ours.parse_args(["--model", "convnext_base"])
    assert (args.lr, args.beta1, args.beta2, args.eps) == (5e-4, 0.9, 0.999, 1e-8)
    args = ours.parse_args(["--model", "ViT-B-32", "--opt", "timm/adamw"])
    assert (args.lr, args.beta1, args.beta2, args.eps) == (None, None, None, None)


@pytest.mark.parametrize("name", ["ViT-B-32", "vit_small", "RN50", "convnext_base", "coca_ViT-L-14", ""])
def test_default_params_match_upstream(upstream, name):
    assert ours.get_default_params(name) == upstream.get_default_params(name)


# ---------------------------------------------------------------- our extras

EXTRA_DEFAULTS = {
    "train_image_root": None,
    "val_image_root": None,
    "coco_caption_sampling": "all",
    "no_augment": False,
    "pretrained_image_path": None,
    "pretrained_text_path": None,
    "text_tokenizer": None,
    "unfreeze_image_at_epoch": None,
    "unlocked_image_groups": None,
    "unfreeze_text_at_epoch": None,
    "unlocked_text_layers": None,
    "unfreeze_new_lr_scale": 0.1,
    "unfreeze_warmup_steps": 0,
    "lock_pattern": [],
    "lr_mult": [],
    "frozen_train_mode": False,
    "val_at_start": False,
    "eval_chunk_size": 1024,
    "dry_run": False,
}


def test_extra_defaults():
    args = vars(ours.parse_args([]))
    assert {k: args[k] for k in EXTRA_DEFAULTS} == EXTRA_DEFAULTS


def test_extra_flags_parse():
    args = ours.parse_args([
        "--dataset-type", "coco", "--train-image-root", "/d/train2017", "--val-image-root", "/d/val2017",
        "--coco-caption-sampling", "random", "--no-augment",
        "--pretrained-image", "--pretrained-image-path", "/w/trunk.safetensors",
        "--pretrained-text-path", "/w/gpt2", "--text-tokenizer", "/w/gpt2-tok",
        "--unfreeze-image-at-epoch", "2", "--unlocked-image-groups", "1",
        "--unfreeze-text-at-epoch", "3", "--unlocked-text-layers", "4",
        "--unfreeze-new-lr-scale", "0.5", "--unfreeze-warmup-steps", "100",
        "--lock-pattern", r"^visual\.trunk\.stem", "--lock-pattern", "ln_final",
        "--frozen-train-mode", "--val-at-start", "--eval-chunk-size", "256", "--dry-run",
    ])
    assert args.dataset_type == "coco"
    assert (args.train_image_root, args.val_image_root) == ("/d/train2017", "/d/val2017")
    assert args.coco_caption_sampling == "random" and args.no_augment
    assert args.pretrained_image and args.pretrained_image_path == "/w/trunk.safetensors"
    assert (args.pretrained_text_path, args.text_tokenizer) == ("/w/gpt2", "/w/gpt2-tok")
    assert (args.unfreeze_image_at_epoch, args.unlocked_image_groups) == (2, 1)
    assert (args.unfreeze_text_at_epoch, args.unlocked_text_layers) == (3, 4)
    assert (args.unfreeze_new_lr_scale, args.unfreeze_warmup_steps) == (0.5, 100)
    assert args.lock_pattern == [r"^visual\.trunk\.stem", "ln_final"]
    assert args.frozen_train_mode and args.val_at_start and args.dry_run
    assert args.eval_chunk_size == 256


@pytest.mark.parametrize("flag", ["--log-dir", "--logs"])
def test_log_dir_alias(flag):
    assert ours.parse_args([flag, "/tmp/somewhere"]).logs == "/tmp/somewhere"
    assert ours.parse_args([f"{flag}=/tmp/eq"]).logs == "/tmp/eq"


def test_log_dir_default():
    assert ours.parse_args([]).logs == "./logs/"


def test_lr_mult_parsing():
    args = ours.parse_args([
        "--lr-mult", r"visual\.=0.1", "--lr-mult", "text.*ln=2", "--lr-mult", "(?=x)a=0",
        "--lr-mult", "logit_scale=1e-1",
    ])
    assert args.lr_mult == [(r"visual\.", 0.1), ("text.*ln", 2.0), ("(?=x)a", 0.0), ("logit_scale", 0.1)]
    assert all(type(m) is float for _, m in args.lr_mult)


def test_default_lists_are_fresh():
    a, b = ours.parse_args([]), ours.parse_args([])
    a.lr_mult.append(("x", 1.0))
    a.lock_pattern.append("x")
    assert b.lr_mult == [] and b.lock_pattern == []
    assert ours.parse_args([]).lr_mult == []


def test_aug_cfg_matches_upstream_and_extends(upstream):
    argv = ["--aug-cfg", "scale=(0.5,1)", "use_timm=True", "mode=pixel", "n=3"]
    assert ours.parse_args(argv).aug_cfg == upstream.parse_args(argv).aug_cfg == {
        "scale": (0.5, 1), "use_timm": True, "mode": "pixel", "n": 3}
    assert ours.parse_args(["--aug-cfg"]).aug_cfg == {}
    assert ours.parse_args(["--aug-cfg", "k=a=b", "e="]).aug_cfg == {"k": "a=b", "e": ""}


def _error_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        ours.parse_args(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("error: ") and line.endswith(" (see --help)")
    assert "usage" not in line and "Traceback" not in captured.err
    return line


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--batch-size", "abc"], "--batch-size"),
        (["--precision", "fp8"], "invalid choice"),
        (["--dataset-type", "parquet"], "invalid choice"),
        (["--coco-caption-sampling", "first"], "invalid choice"),
        (["--lr-mult", "visual"], "REGEX=MULT"),
        (["--lr-mult", "=2"], "REGEX=MULT"),
        (["--lr-mult", "visual=fast"], "must be a number"),
        (["--lr-mult", "visual=-1"], ">= 0"),
        (["--lr-mult", "visual=nan"], ">= 0"),
        (["--lr-mult", "(visual=2"], "invalid regex"),
        (["--lock-pattern", "[unclosed"], "invalid regex"),
        (["--lock-pattern", ""], "empty regex"),
        (["--eval-chunk-size", "0"], ">= 1"),
        (["--unfreeze-image-at-epoch", "-1"], ">= 0"),
        (["--unlocked-text-layers", "two"], "integer"),
        (["--unfreeze-new-lr-scale", "-0.1"], ">= 0"),
        (["--aug-cfg", "noequals"], "KEY=VALUE"),
        (["--model"], "expected one argument"),
        (["--log"], "ambiguous option"),
    ],
)
def test_bad_values_one_line_exit_2(capsys, argv, fragment):
    line = _error_line(capsys, argv)
    assert fragment in line


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["--batch-sz", "3"], "--batch-size"),
        (["--warmpu", "100"], "--warmup"),
        (["--log_dir", "/tmp/x"], "--log-dir"),
        (["--lok-text=1"], "--lock-text"),
        (["--eval-chunksize", "5"], "--eval-chunk-size"),
    ],
)
def test_unknown_flag_suggests_closest(capsys, argv, suggestion):
    line = _error_line(capsys, argv)
    assert "unrecognized arguments" in line
    assert f"did you mean {suggestion}?" in line


def test_unknown_flag_without_close_match(capsys):
    line = _error_line(capsys, ["--zzzzzzzzzzzz"])
    assert "unrecognized arguments: --zzzzzzzzzzzz" in line and "did you mean" not in line


def test_several_unknown_flags(capsys):
    line = _error_line(capsys, ["--warmpu", "3", "--batch-sz", "4"])
    assert "--warmup for --warmpu" in line and "--batch-size for --batch-sz" in line


def test_help_lists_every_flag(capsys, our_parser):
    with pytest.raises(SystemExit) as exc:
        ours.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for action in _option_actions(our_parser):
        assert action.option_strings[0] in out
    for title in ("data:", "locking / freezing:", "distillation:"):
        assert title in out
