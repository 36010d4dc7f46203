"""`--dry-run`: build the model (no data, no weights), resolve the whole freezing schedule and
print it phase by phase: which groups train, the trainable counts and each group's lr."""
from __future__ import annotations

from typing import List

import torch

from .config import RunCfg
from .freeze import apply_trainable, build_plan, count_trainable, format_counts
from .models import create_model, loss_model_kwargs
from .model_overrides import create_model_kwargs
from .optim import make_groups
from .video import attach_video
from .video.training import describe_modules


def describe(cfg: RunCfg) -> List[str]:
    torch.manual_seed(cfg.train.seed)
    model, _ = create_model(cfg.model.name, precision="fp32", device="meta",
                            model_kwargs=loss_model_kwargs(cfg.objective.loss.siglip),
                            overrides=create_model_kwargs(cfg.model.overrides))  # shapes only: fast
    if cfg.video is not None:
        attach_video(model, cfg.video.model)
    plan = build_plan(model, cfg.freeze, cfg.train.epochs)
    lines = [f"dry run: model {cfg.model.name}, {cfg.train.epochs} epochs (no data read, no weights loaded)"]
    lines += [f"  note: {n}" for n in plan.notes]
    for i, phase in enumerate(plan.phases()):
        apply_trainable(model, list(phase.rules))
        counts = count_trainable(model)
        label = "INIT" if i == 0 else f"epoch {phase.start}"
        lines.append(f"phase {i}: epochs [{phase.start}, {phase.end})")
        lines.append(f"  trainable params ({label}): {format_counts(counts)}")
        for tower in ("image", "text", *(["decoder"] if "decoder" in plan.layouts else [])):  # CoCa's decoder
            lines.append("  " + plan.describe_tower(tower, phase.rules))
        lines += ["  " + line for line in describe_modules(model, set(phase.rules))]
        for g in make_groups(model, phase.rules, cfg.optim):
            n = sum(p.numel() for p in g["params"])
            lines.append(f"  group {g['name']:<30} {n:>12,} params  lr {(cfg.optim.lr or 0.0) * g['lr_scale']:.3e} "
                         f"(x{g['lr_scale']:g})  wd {g['weight_decay']:g}")
    return lines
