"""Checkpoint reading and tolerant loading, with a report of what did not line up.

Loading is always non-strict and never crashes on shape mismatches: CLIP students are routinely
initialised from checkpoints of a neighbouring architecture (e.g. a linear-proj head replaced by
an attention pool), and the user needs to see exactly which subtrees stayed random.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

Shape = tuple[int, ...]

# GPT-2 checkpoints may carry the causal-mask buffers of old transformers versions and a tied LM head;
# neither is a weight of GPT2Model.
_GPT2_NON_WEIGHTS = re.compile(r"(^lm_head\.|(^|\.)attn\.(masked_)?bias$)")


@dataclass
class LoadReport:
    """What a create_model call loaded; all names are full model state_dict keys."""
    source: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    # numel of every model tensor and every checkpoint tensor seen, for subtree grouping and counts
    model_numels: dict[str, int] = field(default_factory=dict)
    checkpoint_numels: dict[str, int] = field(default_factory=dict)

    def summary_lines(self, model_param_counts: Mapping[str, int] | None = None) -> list[str]:
        """One line per maximal fully-affected subtree, e.g. 'new: visual.head.pool.* (3,856,000 params)'.

        A module prefix collapses to 'prefix.*' only if every tensor under it, in the model and in the
        checkpoint(s), is in the same list: 'new: visual.head.*' would wrongly suggest the checkpoint had
        no head at all when it had a different one.
        """
        model_counts = dict(model_param_counts) if model_param_counts is not None else self.model_numels
        universe = set(model_counts) | set(self.checkpoint_numels)
        return (
            _lines("new", _group(self.missing, model_counts, universe))
            + _lines("unused", _group(self.unexpected, self.checkpoint_numels, universe))
            + _mismatch_lines(self.mismatched, model_counts, universe)
        )

    def log(self, logger: logging.Logger) -> None:
        if not self.source:
            logger.info("no pretrained weights given: model initialised randomly")
            return
        n_loaded = len(self.model_numels) - len(self.missing)
        logger.info(f"loaded {n_loaded}/{len(self.model_numels)} model tensors from {self.source}")
        for line in self.summary_lines():
            (logger.warning if line.startswith("shape mismatch") else logger.info)(f"  {line}")


def _fmt(count: int) -> str:
    return f"{count:,} param{'' if count == 1 else 's'}"


def _prefixes(key: str) -> list[str]:
    """Proper module prefixes of a key, outermost first: 'a.b.c' -> ['a', 'a.b']."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _group(keys: list[str], counts: Mapping[str, int], universe: set[str]) -> dict[str, int]:
    """Collapse keys into 'prefix.*' wherever every universe key under that module prefix is listed.

    Returns {group name: total numel}, in the order the keys come (model order for model keys).
    """
    selected = set(keys)
    total, hit = Counter(), Counter()
    for k in universe:
        for p in _prefixes(k):
            total[p] += 1
            hit[p] += k in selected
    groups: dict[str, int] = {}
    for k in keys:
        full = [p for p in _prefixes(k) if total[p] and hit[p] == total[p]]
        name = f"{full[0]}.*" if full else k
        groups[name] = groups.get(name, 0) + counts.get(k, 0)
    return groups


def _lines(label: str, groups: dict[str, int]) -> list[str]:
    return [f"{label}: {name} ({_fmt(n)})" for name, n in groups.items()]


def _mismatch_lines(
        mismatched: list[tuple[str, Shape, Shape]], model_counts: Mapping[str, int], universe: set[str],
) -> list[str]:
    shapes = {k: (ck, md) for k, ck, md in mismatched}
    lines = []
    for name, n in _group(list(shapes), model_counts, universe).items():
        if name in shapes:  # a lone tensor: its shapes say more than a count
            ck, md = shapes[name]
            lines.append(f"shape mismatch: {name} (checkpoint {list(ck)} vs model {list(md)})")
        else:
            lines.append(f"shape mismatch: {name} ({_fmt(n)} in the model)")
    return lines


def load_torch_file(path: str | Path, trust: bool = False, mmap: bool = False):
    """torch.load without unpickling arbitrary objects (weights_only), unless `trust`; a file
    that needs more is refused with a ValueError that says so and names --trust-checkpoint."""
    kwargs = {"map_location": "cpu", "weights_only": not trust}
    try:
        return torch.load(path, mmap=mmap, **kwargs)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(path, **kwargs)
        raise ValueError(f"{path} cannot be read as a torch file ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - unpickling refused, or not a torch file at all
        if not trust and "weights_only" in str(e):
            raise ValueError(f"{path} holds pickled objects beyond tensors and plain containers; refusing to "
                             f"unpickle it (pass --trust-checkpoint only if you trust whoever made the file)") from None
        raise ValueError(f"{path} cannot be read as a torch file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file (raw state_dict or {'state_dict': ...}), wrapper prefixes stripped.
    Torch files are read weights-only unless `trust` (see load_torch_file)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    else:
        state = load_torch_file(path, trust)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    # DDP and torch.compile wrappers prefix every key ('module.', then '_orig_mod.')
    return {
        k.removeprefix("module.").removeprefix("_orig_mod."): v
        for k, v in state.items() if isinstance(v, torch.Tensor)
    }


def fit_problems(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], n: int = 3) -> list[str]:
    """The first `n` keys of each kind that keep `state` from loading strictly into a model with
    `model_state` (a meta-device skeleton's is enough: only names and shapes are compared)."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in model_state.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape) and state[k].numel() + v.numel() > 2]
    out = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            out.append(f"{label} {', '.join(keys[:n])}" + (f" (+{len(keys) - n} more)" if len(keys) > n else ""))
    return out


def gpt2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """GPT2Model-style tensors from an HF directory or a weights file (GPT2Model or GPT2LMHeadModel keys)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
        path = found[0]
    state = read_state_dict(path)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not _GPT2_NON_WEIGHTS.search(k)}


def new_report(model: nn.Module) -> LoadReport:
    """A report in which nothing is loaded yet: every model tensor counts as missing."""
    numels = {k: v.numel() for k, v in model.state_dict().items()}
    return LoadReport(missing=list(numels), model_numels=numels)


def load_into(
        model: nn.Module,
        state: Mapping[str, torch.Tensor],
        report: LoadReport,
        source: str,
        prefix: str = "",
) -> None:
    """Load `state` (keys relative to `prefix` in model) non-strictly; record results in `report`."""
    model_state = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = prefix + key
        report.checkpoint_numels[name] = value.numel()
        target = model_state.get(name)
        if target is None:
            report.unexpected.append(name)
        elif value.shape != target.shape and value.numel() == target.numel() == 1:
            matched[name] = value.reshape(target.shape)  # scalar vs [1] logit_scale across open_clip versions
        elif value.shape != target.shape:
            report.mismatched.append((name, tuple(value.shape), tuple(target.shape)))
        else:
            matched[name] = value
    result = model.load_state_dict(matched, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # matched keys were all taken from the model
    report.missing = [k for k in report.missing if k not in matched]
    report.source = f"{report.source}, {source}" if report.source else source
