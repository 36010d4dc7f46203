"""Applying a plan to a live model: requires_grad, and frozen parts kept in eval mode."""
from __future__ import annotations

import types
from typing import List, Sequence, Tuple

import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# applying a plan to a live model


def apply_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    """Set requires_grad from the plan (idempotent: the same call with another epoch's set)."""
    keep = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def _frozen_named_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Maximal submodules (with their names) whose parameters are all frozen, plus parameterless
    modules inside a frozen prefix.

    A parameterless child (dropout, drop-path, activation) belongs to no parameter, so it is judged
    by where it sits: among its siblings in registration order (forward order for the towers here:
    GPT2's wte, wpe, drop, h, ln_f), one that follows a frozen sibling with no trainable sibling
    before it is part of the frozen prefix and runs in eval mode too. That is GPT2's embedding
    dropout when only the embeddings are frozen. A leading parameterless child stays as it is, and
    so do all of them under a parent that itself holds a trainable parameter.
    """
    out: List[Tuple[str, nn.Module]] = []

    def visit_children(name: str, m: nn.Module) -> None:
        # A trainable parameter held by `m` itself (a layer-scale gamma, logit_scale) is used at a
        # point of the forward we cannot see, so it ends any prefix before it starts.
        no_trainable_yet = not any(p.requires_grad for p in m.parameters(recurse=False))
        frozen_seen = False
        for child_name, child in m.named_children():
            full = f"{name}.{child_name}" if name else child_name
            params = list(child.parameters())
            if not params:
                if no_trainable_yet and frozen_seen:
                    out.append((full, child))
            elif not any(p.requires_grad for p in params):
                frozen_seen = True
                out.append((full, child))
            else:
                no_trainable_yet = False
                visit_children(full, child)

    visit_children("", model)
    return out


def frozen_modules(model: nn.Module) -> List[nn.Module]:
    """Maximal submodules whose parameters are all frozen (they hold drop-path/dropout/norms)."""
    return [m for _, m in _frozen_named_modules(model)]


def _eval_targets(model: nn.Module, scope: str) -> List[nn.Module]:
    if scope == "all":
        return frozen_modules(model)
    # 'bn': upstream's --lock-image-freeze-bn-stats, BatchNorm of frozen image-tower modules only.
    return [sub for name, m in _frozen_named_modules(model) if name == "visual" or name.startswith("visual.")
            for sub in m.modules() if isinstance(sub, nn.modules.batchnorm._BatchNorm)]


def _train_keeping_frozen_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    if mode:
        # Recomputed on every call: an unlock flips requires_grad, the next train() follows it.
        for m in _eval_targets(self, self._frozen_eval_scope):
            m.eval()
    return self


def _install_train_override(model: nn.Module, scope: str) -> None:
    # A bound method in the instance dict (not a closure over `model`) so that deepcopy (e.g. an EMA
    # copy) rebinds it to the copy; DDP's train() reaches it through children().
    model._frozen_eval_scope = scope
    model.train = types.MethodType(_train_keeping_frozen_eval, model)  # type: ignore[method-assign]
    if model.training:
        model.train(True)


def install_frozen_eval(model: nn.Module) -> None:
    """Keep frozen parts in eval mode (no drop-path, dropout or norm-stat updates), applied now and
    re-applied on every `model.train()`, also when called through a DDP wrapper."""
    _install_train_override(model, "all")


def freeze_bn_stats(model: nn.Module) -> None:
    """Upstream's --lock-image-freeze-bn-stats for --frozen-train-mode: BN layers of frozen image
    modules stay in eval mode, also across later `model.train()` calls (which would undo a one-off
    `.eval()`). A no-op on top of `install_frozen_eval`, which already covers them."""
    if getattr(model, "_frozen_eval_scope", None) != "all":
        _install_train_override(model, "bn")
