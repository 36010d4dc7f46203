"""Command-line flags for training: upstream OpenCLIP v3.3.0's flags plus ours.

Every upstream flag keeps its dest, type, default, choices, nargs and action, so
scripts written for upstream's ``open_clip_train.main`` keep working. Our changes:

* ``--dataset-type`` also accepts ``coco``.
* ``--log-dir`` is an alias of ``--logs`` (dest ``logs``). Prefer ``--log-dir``:
  torchrun rejects ``--logs`` after the module name as ambiguous with its own
  ``--logs-specs``.
* Extra flags for COCO-style data, local tower weights, staged unfreezing,
  per-parameter learning-rate multipliers, chunked evaluation and dry runs.

A user error (unknown flag, bad value, bad regex) prints one line,
``error: <message> (see --help)``, to stderr and exits with status 2.

argparse stays at this edge: the rest of the code base receives typed configs
built from the returned Namespace.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import math
import re
import sys
from typing import Callable, Sequence

from .errors import register_flags
from .precision import PRECISIONS

__all__ = ["ParseKwargs", "build_parser", "get_default_params", "parse_args"]


# --------------------------------------------------------------------------
# Optimiser defaults (same rule as upstream: CLIP paper values)
# --------------------------------------------------------------------------

_VIT_ADAM = {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
_OTHER_ADAM = {"lr": 5.0e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def get_default_params(model_name: str) -> dict[str, float]:
    """AdamW defaults from the CLIP paper: ViT models (name contains 'vit',
    any case) use beta2 0.98 / eps 1e-6; all others beta2 0.999 / eps 1e-8."""
    return dict(_VIT_ADAM if "vit" in model_name.lower() else _OTHER_ADAM)


# --------------------------------------------------------------------------
# Value types: each raises ArgumentTypeError so the message reaches the user.
# --------------------------------------------------------------------------

def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def _regex(text: str) -> str:
    """A parameter-name regex (matched with re.search). Kept as a string."""
    if not text:
        raise argparse.ArgumentTypeError("empty regex would match every parameter")
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from None
    return text


def _lr_mult(text: str) -> tuple[str, float]:
    """'REGEX=MULT' -> (regex, float). Splits at the last '=' so regexes may contain '='."""
    pattern, sep, mult = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected REGEX=MULT (e.g. 'visual\\.=0.1'), got {text!r}")
    try:
        value = float(mult)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"multiplier in {text!r} must be a number, got {mult!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"multiplier in {text!r} must be a finite number >= 0, got {mult!r}")
    return _regex(pattern), value


class ParseKwargs(argparse.Action):
    """KEY=VALUE ... -> dict; values go through ast.literal_eval, else stay strings.

    Same results as upstream's action on valid input; a token without '=' is a
    one-line user error instead of a traceback, and 'k=a=b' gives {'k': 'a=b'}.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                kw[key] = str(value)  # fallback to string (avoid need to escape on command line)
        setattr(namespace, self.dest, kw)


# --------------------------------------------------------------------------
# Parser with one-line errors
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose user errors are one line on stderr, exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())
        self.exit(2, f"error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return parsed

    def _unrecognized(self, extras: Sequence[str]) -> str:
        known = sorted(self._option_string_actions)
        hints = []
        for token in extras:
            if not token.startswith(tuple(self.prefix_chars)) or _looks_numeric(token):
                continue
            name = token.split("=", 1)[0]
            match = difflib.get_close_matches(name.replace("_", "-"), known, n=1, cutoff=0.6)
            if match:
                hints.append((name, match[0]))
        message = "unrecognized arguments: " + " ".join(extras)
        if len(hints) == 1:
            message += f" (did you mean {hints[0][1]}?)"
        elif hints:
            message += " (did you mean " + ", ".join(f"{m} for {n}" for n, m in hints) + "?)"
        return message


def _looks_numeric(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=40)


# --------------------------------------------------------------------------
# The flags, grouped by concern
# --------------------------------------------------------------------------

def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--train-data", type=str, default=None,
        help="Path to file(s) with training data. When using webdataset, multiple data sources "
             "can be combined using the `::` separator.")
    g.add_argument(
        "--train-data-upsampling-factors", type=str, default=None,
        help="When using multiple data sources with webdataset and sampling with replacement, "
             "upsample specific sources: as many numbers as sources, separated by `::` "
             "(e.g. 1::2::0.5). By default datapoints are sampled uniformly regardless of "
             "dataset sizes.")
    g.add_argument("--val-data", type=str, default=None, help="Path to file(s) with validation data.")
    g.add_argument(
        "--train-num-samples", type=int, default=None,
        help="Number of samples in dataset. Required for webdataset if not in an info file.")
    g.add_argument(
        "--val-num-samples", type=int, default=None,
        help="Number of samples in dataset. Useful for webdataset if not in an info file.")
    g.add_argument(
        "--dataset-type", choices=["webdataset", "csv", "synthetic", "auto", "coco", "msrvtt"], default="auto",
        help="Which type of dataset to process ('coco': COCO captions JSON plus an image root; 'msrvtt': "
             "video-text retrieval, --train-data/--val-data name the folder holding MSRVTT_data.json).")
    g.add_argument(
        "--dataset-resampled", default=False, action="store_true",
        help="Sample webdataset shards with replacement.")
    g.add_argument(
        "--csv-separator", type=str, default="\t",
        help="For csv-like datasets, the separator (default: %(default)r).")
    g.add_argument(
        "--csv-img-key", type=str, default="filepath",
        help="For csv-like datasets, the column with the image paths.")
    g.add_argument(
        "--csv-caption-key", type=str, default="title",
        help="For csv-like datasets, the column with the captions.")
    g.add_argument(
        "--train-image-root", metavar="PATH", default=None,
        help="Directory that relative image paths in --train-data resolve against.")
    g.add_argument(
        "--val-image-root", metavar="PATH", default=None,
        help="Directory that relative image paths in --val-data resolve against.")
    g.add_argument(
        "--coco-caption-sampling", choices=["all", "random"], default="all",
        help="COCO and MSR-VTT: 'all' makes one sample per caption; 'random' one sample per image "
             "(video) with a caption drawn at random each epoch.")
    g.add_argument(
        "--workers", type=int, default=4, help="Number of dataloader workers per GPU.")
    g.add_argument(
        "--image-mean", type=float, nargs="+", default=None, metavar="MEAN",
        help="Override the model's default image mean.")
    g.add_argument(
        "--image-std", type=float, nargs="+", default=None, metavar="STD",
        help="Override the model's default image std deviation.")
    g.add_argument(
        "--image-interpolation", default=None, type=str, choices=["bicubic", "bilinear", "random"],
        help="Override the default image resize interpolation.")
    g.add_argument(
        "--image-resize-mode", default=None, type=str, choices=["shortest", "longest", "squash"],
        help="Override the default image resize (& crop) mode during inference.")
    g.add_argument(
        "--aug-cfg", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
        help="Training augmentation overrides, e.g. scale='(0.4,1.0)' color_jitter=0.4 use_timm=True.")
    g.add_argument(
        "--no-augment", default=False, action="store_true",
        help="Use the evaluation transform for training (no random augmentation).")
    g.add_argument(
        "--frozen-feature-cache", default=None, metavar="DIR",
        help="With --no-augment (implied for --dataset-type msrvtt) and a locked image trunk and/or text tower: "
             "compute their outputs (per image or per video frame, per caption) once into DIR (reused by later "
             "runs and resumes while its manifest matches) and train the rest on them.")
    g.add_argument(
        "--max-bad-samples-fraction", type=_fraction, default=0.01, metavar="F",
        help="Bad samples (missing/empty/truncated/undecodable images, empty captions, broken shard "
             "members) are replaced and counted; stop with an error once more than F of a training "
             "epoch, or of the evaluation set, is bad.")


def _add_video(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video (--dataset-type msrvtt)")
    g.add_argument(
        "--msrvtt-train-split", default="9k", metavar="9k|7k|CSV",
        help="Training videos: the 9k or 7k list under --train-data, or a csv with a video_id column.")
    g.add_argument(
        "--msrvtt-test", choices=["1k-A", "full"], default="1k-A",
        help="Test set: 1k-A (1,000 videos, one caption each) or full (2,990 videos, all 59,800 captions).")
    g.add_argument(
        "--video-root", metavar="DIR", default=None,
        help="Folder of <video_id>.mp4 files, decoded on every read (default: ROOT/videos).")
    g.add_argument(
        "--frames-root", metavar="DIR", default=None,
        help="A frame store written by python -m open_clip_train.extract_frames (read instead of the mp4s).")
    g.add_argument(
        "--video-pooling", choices=["mean", "seqtransf", "afa", "seqtransf-afa"], default="mean",
        help="Frame aggregation: mean (no parameters), seqtransf (CLIP4Clip's temporal transformer), "
             "afa (TeachCLIP's attentional frame aggregation); its parameters are named video_pool.*.")
    g.add_argument(
        "--max-frames", type=_int_at_least(1), default=12, metavar="N",
        help="Frames per video (one per second, evenly thinned to N).")
    g.add_argument(
        "--max-words", type=_int_at_least(2), default=32, metavar="N",
        help="Caption tokens, start and end tokens included (CLIP4Clip's max_words).")
    g.add_argument(
        "--video-temporal-layers", type=_int_at_least(1), default=4, metavar="N",
        help="seqtransf: temporal transformer blocks (initialised from the text tower's first N when widths match).")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model / weights")
    g.add_argument("--model", type=str, default="RN50", help="Model config name.")
    g.add_argument(
        "--pretrained", default="", type=str,
        help="Pretrained CLIP weights: a tag or a file path.")
    g.add_argument(
        "--pretrained-image", default=False, action="store_true",
        help="Load ImageNet-pretrained weights for the image tower backbone if available "
             "(from --pretrained-image-path when given).")
    g.add_argument(
        "--pretrained-image-path", metavar="PATH", default=None,
        help="Local timm trunk weights (safetensors) for --pretrained-image.")
    g.add_argument(
        "--pretrained-text-path", metavar="PATH", default=None,
        help="Local GPT-2 text tower weights: a Hugging Face model dir or a model.safetensors file.")
    g.add_argument(
        "--text-tokenizer", metavar="PATH", default=None,
        help="Local Hugging Face tokenizer directory.")
    g.add_argument(
        "--cache-dir", type=str, default=None,
        help="Override the system cache path for model & tokenizer downloads.")
    g.add_argument(
        "--force-context-length", type=int, default=None, help="Override the default context length.")
    g.add_argument(
        "--force-image-size", type=int, nargs="+", default=None, help="Override the default image size.")
    g.add_argument(
        "--force-quick-gelu", default=False, action="store_true",
        help="Force QuickGELU activation for non-OpenAI transformer models.")
    g.add_argument(
        "--force-patch-dropout", default=None, type=float,
        help="Override patch dropout during training (e.g. 0 to fine-tune without dropout).")
    g.add_argument(
        "--force-custom-text", default=False, action="store_true",
        help="Force use of CustomTextCLIP (separate text tower).")


def _add_optimisation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "optimisation",
        "--lr/--beta1/--beta2/--eps default to the CLIP paper values for the model "
        "(ViT: beta2 0.98, eps 1e-6; others: beta2 0.999, eps 1e-8; lr 5e-4) "
        "unless --opt is a timm optimiser.")
    g.add_argument("--batch-size", type=int, default=64, help="Batch size per GPU.")
    g.add_argument(
        "--opt", type=str, default="adamw",
        help="Optimiser: 'adamw' or any timm optimiser as 'timm/{opt_name}'.")
    g.add_argument("--lr", type=float, default=None, help="Learning rate.")
    g.add_argument("--beta1", type=float, default=None, help="Adam beta 1.")
    g.add_argument("--beta2", type=float, default=None, help="Adam beta 2.")
    g.add_argument("--eps", type=float, default=None, help="Adam epsilon.")
    g.add_argument("--wd", type=float, default=0.2, help="Weight decay.")
    g.add_argument("--momentum", type=float, default=None, help="Momentum (for timm optimisers).")
    g.add_argument(
        "--lr-mult", type=_lr_mult, action="append", default=[], metavar="REGEX=MULT",
        help="Scale the lr of parameters whose name matches REGEX (re.search) by MULT; repeatable.")
    g.add_argument(
        "--accum-freq", type=int, default=1, help="Update the model every --accum-freq steps.")
    g.add_argument("--grad-clip-norm", type=float, default=None, help="Gradient clip norm.")
    g.add_argument("--siglip", default=False, action="store_true", help="Use SigLIP (sigmoid) loss.")
    g.add_argument(
        "--coca-caption-loss-weight", type=float, default=2.0,
        help="Weight of the caption loss in CoCa.")
    g.add_argument(
        "--coca-contrastive-loss-weight", type=float, default=1.0,
        help="Weight of the contrastive loss in CoCa.")


def _add_schedule(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=32, help="Number of epochs to train for.")
    g.add_argument(
        "--epochs-cooldown", type=int, default=None,
        help="With a cooldown scheduler, cool down from epochs - epochs_cooldown onwards.")
    g.add_argument("--warmup", type=int, default=10000, help="Number of warmup steps.")
    g.add_argument(
        "--skip-scheduler", action="store_true", default=False, help="Skip learning-rate decay.")
    g.add_argument(
        "--lr-scheduler", type=str, default="cosine",
        help="One of 'cosine', 'const' (constant), 'const-cooldown' (constant with cooldown).")
    g.add_argument(
        "--lr-cooldown-end", type=float, default=0.0, help="End learning rate of the cooldown.")
    g.add_argument(
        "--lr-cooldown-power", type=float, default=1.0,
        help="Power of the polynomial cooldown (1.0 = linear).")


def _add_precision(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision / performance")
    g.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="amp", help="Floating point precision.")
    g.add_argument("--device", default="cuda", type=str, help="Accelerator to use.")
    g.add_argument(
        "--grad-checkpointing", default=False, action="store_true", help="Enable gradient checkpointing.")
    g.add_argument(
        "--torchscript", default=False, action="store_true",
        help="torch.jit.script the model (and use the JIT OpenAI model if --pretrained openai).")
    g.add_argument(
        "--torchcompile", default=False, action="store_true", help="torch.compile() the model.")
    g.add_argument(
        "--trace", default=False, action="store_true",
        help="torch.jit.trace the model for inference / eval only.")
    g.add_argument(
        "--use-bnb-linear", default=None,
        help="Replace linear layers with this bitsandbytes layer (int8 training/inference, etc.).")


def _add_locking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("locking / freezing")
    g.add_argument(
        "--lock-image", default=False, action="store_true",
        help="Lock the whole image tower (no gradients).")
    g.add_argument(
        "--lock-image-unlocked-groups", type=int, default=0,
        help="Leave the last n image tower layer groups unlocked.")
    g.add_argument(
        "--lock-image-freeze-bn-stats", default=False, action="store_true",
        help="Freeze BatchNorm running stats in locked image tower layers.")
    g.add_argument(
        "--lock-text", default=False, action="store_true",
        help="Lock the whole text tower (no gradients).")
    g.add_argument(
        "--lock-text-unlocked-layers", type=int, default=0,
        help="Leave the last n text tower layer groups unlocked.")
    g.add_argument(
        "--lock-text-freeze-layer-norm", default=False, action="store_true",
        help="Freeze LayerNorm in locked text tower layers.")
    g.add_argument(
        "--unfreeze-image-at-epoch", type=_int_at_least(0), default=None, metavar="E",
        help="At the start of epoch E, unlock the locked image tower (see --unlocked-image-groups).")
    g.add_argument(
        "--unlocked-image-groups", type=_int_at_least(0), default=None, metavar="N",
        help="With --unfreeze-image-at-epoch: how many trailing image layer groups to unlock "
             "(default: all).")
    g.add_argument(
        "--unfreeze-text-at-epoch", type=_int_at_least(0), default=None, metavar="E",
        help="At the start of epoch E, unlock the locked text tower (see --unlocked-text-layers).")
    g.add_argument(
        "--unlocked-text-layers", type=_int_at_least(0), default=None, metavar="N",
        help="With --unfreeze-text-at-epoch: how many trailing text layers to unlock (default: all).")
    g.add_argument(
        "--unfreeze-new-lr-scale", type=_non_negative_float, default=0.1, metavar="S",
        help="Learning-rate scale for parameters unlocked mid-run.")
    g.add_argument(
        "--unfreeze-warmup-steps", type=_int_at_least(0), default=0, metavar="K",
        help="Ramp newly unlocked parameters' lr linearly over K steps.")
    g.add_argument(
        "--lock-pattern", type=_regex, action="append", default=[], metavar="REGEX",
        help="Freeze parameters whose name matches REGEX (re.search); repeatable.")
    g.add_argument(
        "--compile-frozen", nargs="?", choices=("auto", "on", "off"), const="on", default="auto",
        help="While the image trunk is fully frozen, run it with torch.compile and without autograd. "
             "auto (default): when the timed eager forward x the frozen steps left pays for the compile; "
             "on (also plain --compile-frozen): always; off: never.")
    g.add_argument(
        "--trim-text-padding", default=True, action=argparse.BooleanOptionalAction,
        help="Run causal text towers (CLIP text, GPT-2) only on the tokens up to the batch's last EOS: "
             "the padding after it changes no output or gradient (default on; --no-trim-text-padding "
             "runs the full context length).")
    g.add_argument(
        "--frozen-train-mode", default=False, action="store_true",
        help="Keep fully frozen modules in train mode (dropout/BatchNorm behave as in training).")


def _add_evaluation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--imagenet-val", type=str, default=None,
        help="Path to the ImageNet val set for zero-shot evaluation.")
    g.add_argument(
        "--imagenet-v2", type=str, default=None,
        help="Path to ImageNet-V2 for zero-shot evaluation.")
    g.add_argument("--zeroshot-frequency", type=int, default=2, help="Run zero-shot every n epochs.")
    g.add_argument(
        "--zeroshot-data", metavar="DIR", default=None,
        help="Zero-shot classification on any ImageFolder (one sub-folder per class, sorted), "
             "reported as zeroshot-<name>-top1/-top5.")
    g.add_argument(
        "--zeroshot-classnames", metavar="FILE", default=None,
        help="Class names for --zeroshot-data, one per line in folder order (default: the folder names).")
    g.add_argument(
        "--zeroshot-templates", metavar="FILE", default=None,
        help="Prompt templates for --zeroshot-data, one per line with {} for the class name "
             "(default: OpenAI's ImageNet templates).")
    g.add_argument(
        "--zeroshot-name", metavar="NAME", default=None,
        help="The <name> in --zeroshot-data's result keys (default: the folder's name).")
    g.add_argument("--val-frequency", type=int, default=1, help="Run validation every n epochs.")
    g.add_argument(
        "--val-at-start", default=False, action="store_true", help="Evaluate before training.")
    g.add_argument(
        "--eval-chunk-size", type=_int_at_least(1), default=1024, metavar="N",
        help="Chunk size for the retrieval similarity computation during evaluation.")


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging / outputs")
    g.add_argument(
        "--log-dir", "--logs", dest="logs", type=str, default="./logs/", metavar="DIR",
        help="Where to store logs and checkpoints; 'none' to store nothing. Prefer --log-dir: "
             "torchrun rejects --logs as ambiguous.")
    g.add_argument(
        "--log-local", action="store_true", default=False,
        help="Log on every node's local master, not only the global master.")
    g.add_argument(
        "--name", type=str, default=None,
        help="Experiment name (log sub-directory). Default: derived from the current time.")
    g.add_argument(
        "--log-every-n-steps", type=int, default=100,
        help="Log every n steps to tensorboard/console/wandb.")
    g.add_argument(
        "--report-to", default="", type=str,
        help="'wandb', 'tensorboard' or 'wandb,tensorboard'.")
    g.add_argument("--wandb-notes", default="", type=str, help="Notes when logging with wandb.")
    g.add_argument(
        "--wandb-project-name", type=str, default="open-clip", help="wandb project name.")
    g.add_argument("--debug", default=False, action="store_true", help="Log more information.")
    g.add_argument(
        "--copy-codebase", default=False, action="store_true",
        help="Copy the code base into the log directory and run from there.")
    g.add_argument("--save-frequency", type=int, default=1, help="Save a checkpoint every n epochs.")
    g.add_argument(
        "--save-most-recent", action="store_true", default=False,
        help="Always save the most recent model to epoch_latest.pt.")
    g.add_argument(
        "--delete-previous-checkpoint", default=False, action="store_true",
        help="Delete the previous checkpoint after saving a new one.")
    g.add_argument(
        "--save-every-n-steps", type=_int_at_least(0), default=0, metavar="N",
        help="Also checkpoint every N optimizer steps inside an epoch (step_S.pt, only the newest kept), "
             "so --resume latest continues from that batch. 0: only at epoch ends.")
    g.add_argument(
        "--resume", default=None, type=str,
        help="Checkpoint to resume from ('latest' for the newest in this run's directory).")
    g.add_argument(
        "--remote-sync", type=str, default=None, help="Optionally sync to this remote path.")
    g.add_argument(
        "--remote-sync-frequency", type=int, default=300,
        help="Seconds between remote syncs if --remote-sync is set.")
    g.add_argument(
        "--remote-sync-protocol", choices=["s3", "fsspec"], default="s3",
        help="How to sync if --remote-sync is set.")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed")
    g.add_argument("--dist-url", default=None, type=str, help="URL used to set up distributed training.")
    g.add_argument(
        "--dist-backend", default=None, type=str,
        help="Distributed backend: 'nccl' for GPU, 'hccl' for Ascend NPU.")
    g.add_argument("--horovod", default=False, action="store_true", help="Use horovod.")
    g.add_argument(
        "--ddp-static-graph", default=False, action="store_true",
        help="Enable DDP static graph optimisation.")
    g.add_argument(
        "--no-set-device-rank", default=False, action="store_true",
        help="Don't set the device index from the local rank (one visible device per process).")
    g.add_argument("--use-bn-sync", default=False, action="store_true", help="Use synchronised BatchNorm.")
    g.add_argument(
        "--local-loss", default=False, action="store_true",
        help="Compute the loss with local features @ global (not the full global @ global matrix).")
    g.add_argument(
        "--gather-with-grad", default=False, action="store_true",
        help="Full distributed gradient through the feature gather.")
    g.add_argument(
        "--loss-dist-impl", default=None, type=str,
        help="A specific distributed loss implementation.")


def _add_distillation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation")
    g.add_argument("--distill-model", default=None, help="Model arch to distill from, if any.")
    g.add_argument("--distill-pretrained", default=None, help="Pretrained weights to distill from, if any.")
    g.add_argument("--distill", default=False, action="store_true",
                   help="Distil from a frozen teacher (--teacher-model, --teacher-pretrained).")
    g.add_argument("--teacher-model", default=None,
                   help="Teacher architecture (alias of upstream's --distill-model).")
    g.add_argument("--teacher-pretrained", default=None,
                   help="Teacher weights, a local open_clip checkpoint (alias of --distill-pretrained).")
    g.add_argument("--teacher-text-tokenizer", default=None,
                   help="Local HF tokenizer dir for a GPT2 teacher.")
    g.add_argument("--teacher-cache", default=None,
                   help="Teacher embeddings written by `python -m open_clip_train.extract_teacher`: train "
                        "without running (or building) the teacher; its manifest must match this run. With "
                        "--dataset-type msrvtt: DIR[,DIR2,...], one video teacher per directory, targets averaged.")
    g.add_argument("--no-teacher-share", default=False, action="store_true",
                   help="A live teacher always runs its whole forward, also where it could reuse the "
                        "student's identical frozen trunk / text tower.")
    g.add_argument("--distill-weight", type=float, default=1.0, help="Weight of the distillation KL term.")
    g.add_argument("--distill-coarse", default=None, choices=["pear", "ce", "l1"],
                   help="Video (TeachCLIP) coarse term: the teacher's video-text logits vs the student's (default pear).")
    g.add_argument("--distill-fine", default=None, choices=["ce", "pear", "l1"],
                   help="Video (TeachCLIP) fine term: the teacher's frame relevance vs the student's AFA weights "
                        "(default ce).")
    g.add_argument("--distill-gt-weight", type=float, default=None,
                   help="Video distillation: weight of the ground-truth contrastive term (TeachCLIP's default "
                        "for the coarse method: 1 for ce, else 0.2).")
    g.add_argument("--distill-coarse-weight", type=float, default=None,
                   help="Video distillation: weight of the coarse term (default 10 for ce, else 1).")
    g.add_argument("--distill-fine-weight", type=float, default=None,
                   help="Video distillation: weight of the fine term (default 1 for ce coarse, else 2).")
    g.add_argument("--distill-temperature", type=float, default=1.0, help="Temperature of the distillation KL.")
    g.add_argument("--headalign", default=False, action="store_true",
                   help="Align the new image head to the checkpoint's own (frozen) head on the same trunk features.")
    g.add_argument("--headalign-weight", type=float, default=1.0, help="Weight of the head-alignment term.")
    g.add_argument("--headalign-mode", choices=("cosine", "kl"), default="cosine",
                   help="cosine: 1 - cos of image embeddings; kl: image-text logit distributions.")


def _add_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="Random seed.")
    g.add_argument(
        "--dry-run", default=False, action="store_true",
        help="Validate the configuration, build everything, then exit before training.")
    g.add_argument(
        "--malloc-retain", default=True, action=argparse.BooleanOptionalAction,
        help="CPU training: keep freed host memory for reuse (glibc mmap/trim thresholds) instead of "
             "page-faulting it in again every step (default on; --no-malloc-retain keeps glibc's defaults).")
    g.add_argument(
        "--skip-nonfinite-steps", type=_int_at_least(0), default=0, metavar="K",
        help="Skip up to K optimizer steps whose loss (or, without a grad scaler, gradient) is "
             "non-finite; by default the first one stops the run (exit code 3).")
    g.add_argument(
        "--trust-checkpoint", default=False, action="store_true",
        help="Allow checkpoints/weights that need full unpickling (only for files you trust).")


_GROUPS = (
    _add_data, _add_video, _add_model, _add_optimisation, _add_schedule, _add_precision,
    _add_locking, _add_evaluation, _add_logging, _add_distributed, _add_distillation, _add_run,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """A fresh parser with every upstream v3.3.0 flag plus ours."""
    parser = _Parser(
        prog=prog,
        usage="%(prog)s [options]",
        description="Train CLIP models (OpenCLIP-compatible flags plus extensions).",
        formatter_class=_HelpFormatter,
    )
    for add_group in _GROUPS:
        add_group(parser)
    return parser


def flag_spellings(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each setting's option string (its first long one), for the library's messages."""
    spelling = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest not in spelling:
            spelling[action.dest] = long[0]
    return spelling


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse argv (sys.argv[1:] when None) and fill derived defaults as upstream does; the
    library's error messages then spell settings as this command line does."""
    parser = build_parser()
    register_flags(flag_spellings(parser))
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    # Upstream: optimiser defaults from the model name, unless a timm optimiser is used.
    if "timm" not in args.opt:
        for name, value in get_default_params(args.model).items():
            if getattr(args, name) is None:
                setattr(args, name, value)

    # Fresh lists per call, so callers never share argparse's default objects.
    args.lock_pattern = list(args.lock_pattern)
    args.lr_mult = list(args.lr_mult)
    return args
