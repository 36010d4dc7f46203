"""Optimizer and param groups, keyed by parameter *name*.

Each group carries static metadata the schedule needs: `name`, `param_names`, `lr_scale`,
`ramp_start`/`ramp_steps` (linear warm-up of groups unlocked mid-run). `apply_lr` is the one
place that turns the scheduled base lr into per-group lrs. Unlocking adds groups; existing
groups and their optimizer state are never touched.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .errors import UserError, flag
from .freeze import ParamRule
from .schedule import ramp


@dataclass(frozen=True)
class OptimCfg:
    name: str = "adamw"
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    momentum: float = 0.9  # only for sgd-style optimizers


def decays(name: str, p: nn.Parameter) -> bool:
    """Upstream's rule: no weight decay for gains, biases, norms and logit_scale."""
    return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def make_groups(
    model: nn.Module, rules: Dict[str, ParamRule], cfg: OptimCfg, ramp_start: int = 0, ramp_steps: int = 0
) -> List[dict]:
    """Param groups for the given trainable params, split by (origin, lr scale, weight decay)."""
    params = dict(model.named_parameters())
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name in params:  # model order keeps groups and state positions deterministic
        rule = rules.get(name)
        if rule is None:
            continue
        wd = cfg.weight_decay if decays(name, params[name]) else 0.0
        key = (rule.origin, rule.lr_scale, wd)
        if key not in groups:
            label = rule.origin + ("" if rule.lr_scale == 1 else f"/x{rule.lr_scale:g}") + ("" if wd else "/no_wd")
            is_unlock = rule.origin != "base"
            groups[key] = {
                "name": label,
                "params": [],
                "param_names": [],
                # Scaled from the start: with --skip-scheduler nothing else ever sets a group's lr.
                **({"lr": cfg.lr * rule.lr_scale} if cfg.lr is not None else {}),
                "lr_scale": rule.lr_scale,
                "weight_decay": wd,
                "ramp_start": ramp_start if is_unlock else 0,
                "ramp_steps": ramp_steps if is_unlock else 0,
            }
        groups[key]["params"].append(params[name])
        groups[key]["param_names"].append(name)
    return list(groups.values())


def _fused_supported(groups: List[dict]) -> bool:
    """AdamW's fused kernel (one pass over all params instead of a Python loop per tensor; same
    update, differences at rounding level) needs floating-point params on CPU or CUDA. Unlock
    groups added later hold params of the same model, so they qualify alike."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(groups: List[dict], cfg: OptimCfg) -> torch.optim.Optimizer:
    if not groups:
        raise UserError("nothing to train: every parameter is frozen at the start of the run")
    name = cfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 fused=_fused_supported(groups))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    try:  # upstream spells timm optimizers 'timm/{name}'; timm's registry knows them without the prefix
        from timm.optim import create_optimizer_v2
    except ImportError:  # pragma: no cover
        raise UserError(f"unknown optimizer {cfg.name!r}") from None
    kwargs = {}
    if cfg.eps is not None:
        kwargs["eps"] = cfg.eps
    if cfg.beta1 is not None and cfg.beta2 is not None:
        kwargs["betas"] = (cfg.beta1, cfg.beta2)
    try:  # our groups go in as they are: timm keeps their weight decay and lr
        return create_optimizer_v2(groups, opt=name.removeprefix("timm/"), lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, momentum=cfg.momentum, **kwargs)
    except Exception as e:  # timm raises assorted errors for unknown names
        raise UserError(f"{flag('opt')} {cfg.name}: {e}") from None


def add_groups(optimizer: torch.optim.Optimizer, groups: Sequence[dict]) -> None:
    """Append groups for newly unlocked params (same hyper-parameters as the existing ones)."""
    existing = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for g in groups:
        if any(id(p) in existing for p in g["params"]):
            raise RuntimeError(f"param group {g['name']} repeats parameters already being optimised")
        optimizer.add_param_group(dict(g))


def apply_lr(optimizer: torch.optim.Optimizer, step: int, base_lr: float) -> None:
    for g in optimizer.param_groups:
        # .get: a group added by other code (no metadata) just follows the schedule.
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * ramp(step, g.get("ramp_start", 0), g.get("ramp_steps", 0))


def group_layout(optimizer: torch.optim.Optimizer) -> List[dict]:
    """What a checkpoint needs to rebuild the groups by name (positions follow from it)."""
    keys = ("name", "param_names", "lr_scale", "weight_decay", "ramp_start", "ramp_steps")
    return [{k: g[k] for k in keys} for g in optimizer.param_groups]


def groups_from_layout(model: nn.Module, layout: List[dict]) -> List[dict]:
    params = dict(model.named_parameters())
    missing = [n for g in layout for n in g["param_names"] if n not in params]
    if missing:
        raise UserError(f"checkpoint param groups name parameters this model lacks, e.g. {missing[:3]}")
    return [dict(g, params=[params[n] for n in g["param_names"]], param_names=list(g["param_names"])) for g in layout]


def check_coverage(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable param sits in exactly one group; frozen params in none."""
    seen: Dict[int, str] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in seen:
                raise RuntimeError(f"a parameter sits in two param groups ({seen[id(p)]}, {g['name']})")
            seen[id(p)] = g["name"]
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            raise RuntimeError(f"trainable parameter {n} is in no param group")
        if not p.requires_grad and id(p) in seen:
            raise RuntimeError(f"frozen parameter {n} is still in param group {seen[id(p)]}")


def group_table(optimizer: torch.optim.Optimizer) -> List[str]:
    rows = [f"{'param group':<34} {'#params':>12} {'lr scale':>9} {'wd':>6}"]
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        rows.append(f"{g['name']:<34} {n:>12,} {g['lr_scale']:>9g} {g['weight_decay']:>6g}")
    return rows
