"""Freezing as data: which parameters train, in which param group, at which lr scale, per epoch.

One layer enumeration per tower (`tower_layout`) serves locking at start, unlocking at an
epoch and lr scaling alike. Groups are ordered input -> output and counted from the output
end, as upstream's `lock(unlocked_groups=N)` and timm's `group_matcher` do:

* image tower: timm `group_matcher()` groups of `visual.trunk` (stem, every block, final norm);
  `visual.head` (the attention-pool head, new to the trunk) is the tower's head.
* CLIP text tower: upstream's groups: [embeddings], blocks[:-1], [last block + ln_final],
  [text_projection]. GPT2 tower: [wte+wpe], h[:-1], [h[-1] + ln_f]; its mlp `proj` is the head.

A head stays trainable under `--lock-*`; only `--lock-pattern` or `--lr-mult RE=0` freeze it.
The plan asserts that every parameter belongs to exactly one tower group or head (or is shared).
"""
from __future__ import annotations

import logging
import re
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .errors import UserError

TOWERS = ("image", "text")
SHARED = ("logit_scale", "logit_bias")
# Upstream's HF lock leaves params of modules named "LayerNorm" (BERT naming) trainable unless
# --lock-text-freeze-layer-norm; other towers treat norms like any other weight.
_HF_LAYERNORM = "LayerNorm"


@dataclass(frozen=True)
class TowerSchedule:
    lock: bool = False
    unlocked_groups: int = 0  # groups left trainable at start, from the output end
    freeze_norm: bool = False  # image: BN stats; text: HF "LayerNorm" params
    unfreeze_at_epoch: Optional[int] = None  # completed epochs before the unlock applies
    unfreeze_groups: Optional[int] = None  # None = the whole tower


@dataclass(frozen=True)
class FreezeCfg:
    image: TowerSchedule = TowerSchedule()
    text: TowerSchedule = TowerSchedule()
    new_lr_scale: float = 0.1
    unfreeze_warmup_steps: int = 0
    lock_patterns: Tuple[str, ...] = ()
    lr_mults: Tuple[Tuple[str, float], ...] = ()
    frozen_train_mode: bool = False

    def tower(self, name: str) -> TowerSchedule:
        return self.image if name == "image" else self.text


@dataclass
class TowerLayout:
    name: str
    groups: List[List[str]]  # full parameter names, input -> output
    head: List[str] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return [n for g in self.groups for n in g] + self.head


# ---------------------------------------------------------------------------------------------
# layer enumeration


def _prefixed(prefix: str, module: nn.Module) -> List[str]:
    return [f"{prefix}{n}" for n, _ in module.named_parameters()]


def _image_layout(model: nn.Module) -> TowerLayout:
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        by_id = group_parameters(trunk, trunk.group_matcher())
        groups = [[f"visual.trunk.{n}" for n in by_id[k]] for k in sorted(by_id)]
        head = [n for n in _prefixed("visual.", visual) if not n.startswith("visual.trunk.")]
        return TowerLayout("image", groups, head)
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        # open_clip VisionTransformer, grouped as upstream's VisionTransformer.lock does.
        blocks = visual.transformer.resblocks
        block_names = [_prefixed(f"visual.transformer.resblocks.{i}.", b) for i, b in enumerate(blocks)]
        in_blocks = {n for g in block_names for n in g}
        rest = [n for n in _prefixed("visual.", visual) if n not in in_blocks]
        first = [n for n in rest if not re.match(r"visual\.(ln_post|proj$)", n)]
        last = [n for n in rest if n.startswith("visual.ln_post")]
        proj = [n for n in rest if n == "visual.proj"]
        groups = [first, *block_names[:-1], block_names[-1] + last] + ([proj] if proj else [])
        return TowerLayout("image", [g for g in groups if g])
    # Unknown tower: one group per child module, in registration order.
    groups = [_prefixed(f"visual.{c}.", m) for c, m in visual.named_children()]
    direct = [f"visual.{n}" for n, _ in visual.named_parameters(recurse=False)]
    return TowerLayout("image", [g for g in [direct, *groups] if g])


def _text_layout(model: nn.Module) -> TowerLayout:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "layer_groups"):  # our GPT2 tower
        groups = [[f"text.{n}" for n in g] for g in text.layer_groups()]
        grouped = {n for g in groups for n in g}
        head = [n for n in _prefixed("text.", text) if n not in grouped]
        return TowerLayout("text", groups, head)
    if text is not None and hasattr(text, "transformer") and hasattr(text.transformer, "encoder"):
        return _hf_text_layout(text)
    owner, prefix = (text, "text.") if text is not None else (model, "")
    blocks = owner.transformer.resblocks
    emb = [f"{prefix}{a}" for a in ("token_embedding.weight", "positional_embedding", "cls_emb")]
    names = {n for n, _ in model.named_parameters()}
    emb = [n for n in emb if n in names]
    block_groups = [_prefixed(f"{prefix}transformer.resblocks.{i}.", b) for i, b in enumerate(blocks)]
    ln_final = [n for n in names if n.startswith(f"{prefix}ln_final.")]
    proj = [n for n in names if n.startswith(f"{prefix}text_projection")]
    groups = [emb, *block_groups[:-1], block_groups[-1] + sorted(ln_final)] + ([sorted(proj)] if proj else [])
    return TowerLayout("text", [g for g in groups if g])


def _hf_text_layout(text: nn.Module) -> TowerLayout:
    """HF encoder towers (BERT-like): [embeddings], layers[:-1], [last layer + rest of trunk]."""
    tr = text.transformer
    layers = tr.encoder.layer
    layer_groups = [_prefixed(f"text.transformer.encoder.layer.{i}.", l) for i, l in enumerate(layers)]
    in_layers = {n for g in layer_groups for n in g}
    trunk = _prefixed("text.transformer.", tr)
    emb = [n for n in trunk if n.startswith("text.transformer.embeddings.")]
    rest = [n for n in trunk if n not in in_layers and n not in emb]
    head = [n for n in _prefixed("text.", text) if not n.startswith("text.transformer.")]
    return TowerLayout("text", [emb, *layer_groups[:-1], layer_groups[-1] + rest], head)


def tower_layout(model: nn.Module) -> Dict[str, TowerLayout]:
    """The layer enumeration of both towers; asserts it covers every parameter exactly once."""
    layouts = {"image": _image_layout(model), "text": _text_layout(model)}
    seen: Dict[str, str] = {}
    for tower in layouts.values():
        for n in tower.names:
            if n in seen:
                raise RuntimeError(f"parameter {n} is enumerated twice ({seen[n]} and {tower.name})")
            seen[n] = tower.name
    all_names = [n for n, _ in model.named_parameters()]
    uncovered = [n for n in all_names if n not in seen and n not in SHARED]
    if uncovered:
        raise RuntimeError(f"layer enumeration misses {len(uncovered)} params, e.g. {uncovered[:3]}")
    return layouts


def tower_of(name: str) -> str:
    if name in SHARED:
        return "shared"
    return "image" if name.startswith("visual.") else "text"


def count_trainable(model: nn.Module) -> Dict[str, int]:
    """Trainable parameter counts: visual = the image tower, text = the whole text side
    (wherever the tower keeps its params: CLIP's sits at the model's top level)."""
    counts = {"visual": 0, "text": 0, "total": 0}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        counts["total"] += p.numel()
        tower = tower_of(n)
        if tower == "image":
            counts["visual"] += p.numel()
        elif tower == "text":
            counts["text"] += p.numel()
    return counts


def format_counts(counts: Dict[str, int]) -> str:
    return f"visual={counts['visual']}, text={counts['text']}, total={counts['total']}"


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class ParamRule:
    origin: str  # 'base' or e.g. 'unlock_image@5'
    lr_scale: float
    since_epoch: int


@dataclass
class Unlock:
    epoch: int
    tower: str
    names: List[str]
    origin: str


@dataclass
class Phase:
    start: int
    end: int  # exclusive
    rules: Dict[str, ParamRule]


@dataclass
class FreezePlan:
    layouts: Dict[str, TowerLayout]
    base: Dict[str, ParamRule]
    unlocks: List[Unlock]
    epochs: int
    notes: List[str]
    cfg: FreezeCfg

    def rules_at(self, epoch: int) -> Dict[str, ParamRule]:
        """Trainable params (and their group rule) for training epoch `epoch` (0-based)."""
        rules = dict(self.base)
        for u in self.unlocks:
            if u.epoch <= epoch:
                scale = self.cfg.new_lr_scale
                for n in u.names:
                    rules[n] = ParamRule(u.origin, scale * _lr_mult(n, self.cfg.lr_mults), u.epoch)
        return rules

    def unlocks_at(self, epoch: int) -> List[Unlock]:
        return [u for u in self.unlocks if u.epoch == epoch]

    def phases(self) -> List[Phase]:
        starts = sorted({0, *[u.epoch for u in self.unlocks if u.epoch < self.epochs]})
        ends = starts[1:] + [self.epochs]
        return [Phase(s, e, self.rules_at(s)) for s, e in zip(starts, ends)]

    def describe_tower(self, tower: str, rules: Dict[str, ParamRule]) -> str:
        layout = self.layouts[tower]
        n = len(layout.groups)
        trainable_groups = [i for i, g in enumerate(layout.groups) if all(x in rules for x in g)]
        partial = [i for i, g in enumerate(layout.groups) if any(x in rules for x in g)]
        head = ""
        if layout.head:
            head_on = all(x in rules for x in layout.head)
            head = ", head trainable" if head_on else ", head frozen"
        if len(trainable_groups) == n:
            body = f"all {n} groups trainable"
        elif not partial:
            body = f"locked (0/{n} groups trainable)"
        elif trainable_groups == list(range(n - len(trainable_groups), n)) and len(partial) == len(trainable_groups):
            body = f"last {len(trainable_groups)}/{n} groups trainable"
        else:
            body = f"{len(partial)}/{n} groups (partly) trainable: {_ranges(partial)}"
        return f"{tower}: {body}{head}"


def _ranges(ids: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out)


def _lr_mult(name: str, lr_mults: Sequence[Tuple[str, float]]) -> float:
    """The longest matching --lr-mult pattern wins; 1.0 when none matches."""
    best: Optional[Tuple[str, float]] = None
    for pattern, mult in lr_mults:
        if re.search(pattern, name) and (best is None or len(pattern) > len(best[0])):
            best = (pattern, mult)
    return 1.0 if best is None else best[1]


def _flag(tower: str, what: str) -> str:
    return {
        ("image", "lock"): "--lock-image",
        ("text", "lock"): "--lock-text",
        ("image", "at"): "--unfreeze-image-at-epoch",
        ("text", "at"): "--unfreeze-text-at-epoch",
        ("image", "n"): "--unlocked-image-groups",
        ("text", "n"): "--unlocked-text-layers",
        ("image", "start_n"): "--lock-image-unlocked-groups",
        ("text", "start_n"): "--lock-text-unlocked-layers",
    }[(tower, what)]


def build_plan(model: nn.Module, cfg: FreezeCfg, epochs: int) -> FreezePlan:
    """Resolve the freezing flags against the model into a per-epoch plan (validating them)."""
    layouts = tower_layout(model)
    names = [n for n, _ in model.named_parameters()]
    notes: List[str] = []

    # The CLI validates regexes and signs already; FreezeCfg built in code gets the same messages.
    for p in (*cfg.lock_patterns, *(p for p, _ in cfg.lr_mults)):
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"invalid parameter-name regex {p!r}: {e}") from None
    for p, mult in cfg.lr_mults:
        if not mult >= 0:
            raise UserError(f"--lr-mult {p}={mult}: the multiplier must be >= 0 (0 freezes)")
    pattern_hits = {p: [n for n in names if re.search(p, n)] for p in cfg.lock_patterns}
    for p, hit in pattern_hits.items():
        if not hit:
            raise UserError(f"--lock-pattern {p!r} matches no parameter; check the names with --dry-run")
    seen_mults: Dict[str, float] = {}
    for p, mult in cfg.lr_mults:
        if p in seen_mults:
            raise UserError(f"--lr-mult pattern {p!r} is given twice ({seen_mults[p]:g} and {mult:g}); give it once")
        seen_mults[p] = mult
    mult_hits = [[n for n in names if re.search(p, n)] for p, _ in cfg.lr_mults]
    for (p, _), hit in zip(cfg.lr_mults, mult_hits):
        if not hit:
            raise UserError(f"--lr-mult pattern {p!r} matches no parameter; check the names with --dry-run")
    if cfg.new_lr_scale < 0:
        raise UserError(f"--unfreeze-new-lr-scale must be >= 0 (got {cfg.new_lr_scale})")

    frozen_start: set = set()
    never: set = {n for n in names if _lr_mult(n, cfg.lr_mults) == 0}
    if never:
        notes.append(f"--lr-mult ...=0 freezes {len(never)} params for the whole run")
    unlocks: List[Unlock] = []
    for tower in TOWERS:
        sched, layout = cfg.tower(tower), layouts[tower]
        frozen_start |= _tower_frozen_at_start(tower, sched, layout, pattern_hits, notes)
        unlock = _tower_unlock(tower, sched, layout, frozen_start, never, epochs, notes)
        if unlock is not None:
            unlocks.append(unlock)

    # logit_scale/logit_bias belong to no tower; a --lock-pattern naming them still freezes them.
    shared_by_pattern = {n for hit in pattern_hits.values() for n in hit if tower_of(n) == "shared"}
    if shared_by_pattern:
        notes.append(f"shared: froze {', '.join(sorted(shared_by_pattern))} by --lock-pattern")
    frozen_start |= never | shared_by_pattern
    base = {n: ParamRule("base", _lr_mult(n, cfg.lr_mults), 0) for n in names if n not in frozen_start}
    plan = FreezePlan(layouts, base, unlocks, epochs, notes, cfg)

    # An --lr-mult that only touches parameters frozen for the whole run is a mistake.
    ever_trainable = set(base) | {n for u in unlocks for n in u.names}
    for (p, mult), hit in zip(cfg.lr_mults, mult_hits):
        if mult != 0 and not any(n in ever_trainable for n in hit):
            raise UserError(f"--lr-mult {p}={mult} only matches parameters that stay frozen all run")
    return plan


def _tower_frozen_at_start(tower, sched: TowerSchedule, layout: TowerLayout, pattern_hits, notes) -> set:
    tower_names = set(layout.names)
    by_pattern = {n for hit in pattern_hits.values() for n in hit if n in tower_names}
    n_groups = len(layout.groups)
    if not 0 <= sched.unlocked_groups <= n_groups:
        raise UserError(f"{_flag(tower, 'start_n')} {sched.unlocked_groups}: must be between 0 and {n_groups} "
                        f"(the {tower} tower has {n_groups} layer groups)")
    if sched.unlocked_groups and not sched.lock:
        raise UserError(f"{_flag(tower, 'start_n')} needs {_flag(tower, 'lock')}")
    if by_pattern:
        if sched.lock:
            notes.append(f"{tower}: --lock-pattern wins over {_flag(tower, 'lock')} (pattern > layer count > whole tower)")
        notes.append(f"{tower}: froze {len(by_pattern)} params by --lock-pattern")
        return by_pattern
    if not sched.lock:
        return set()
    keep = sched.unlocked_groups
    frozen_groups = layout.groups[: n_groups - keep] if keep else layout.groups
    frozen = {n for g in frozen_groups for n in g}
    if tower == "text" and not sched.freeze_norm:
        frozen = {n for n in frozen if _HF_LAYERNORM not in n.split(".")}
    how = f"layer count: last {keep}/{n_groups} groups trainable" if keep else f"whole tower ({n_groups} groups)"
    notes.append(f"{tower}: locked by {how}")
    return frozen


def _tower_unlock(tower, sched, layout, frozen_start, never, epochs, notes) -> Optional[Unlock]:
    if sched.unfreeze_at_epoch is None:
        if sched.unfreeze_groups is not None:
            raise UserError(f"{_flag(tower, 'n')} needs {_flag(tower, 'at')}")
        return None
    epoch = sched.unfreeze_at_epoch
    tower_frozen = [n for n in layout.names if n in frozen_start]
    if not tower_frozen:
        raise UserError(
            f"{_flag(tower, 'at')} {epoch}: the {tower} tower is not locked "
            f"(add {_flag(tower, 'lock')} or a --lock-pattern for it)"
        )
    if epoch < 1:
        raise UserError(f"{_flag(tower, 'at')} must be >= 1 (completed epochs before the unlock), got {epoch}")
    if epoch > epochs:
        raise UserError(f"{_flag(tower, 'at')} {epoch} is beyond the run (--epochs {epochs})")
    n_groups = len(layout.groups)
    count = sched.unfreeze_groups
    if count is not None and not 1 <= count <= n_groups:
        raise UserError(f"{_flag(tower, 'n')} {count}: must be between 1 and {n_groups} "
                        f"(the {tower} tower has {n_groups} layer groups)")
    groups = layout.groups if count is None else layout.groups[n_groups - count:]
    wanted = [n for g in groups for n in g]
    if count is None:
        wanted += layout.head
    new = [n for n in wanted if n in frozen_start and n not in never]
    if not new:
        raise UserError(f"{_flag(tower, 'at')} {epoch}: nothing left to unlock in the {tower} tower")
    if epoch == epochs:
        msg = f"{_flag(tower, 'at')} {epoch} is never reached: the run ends after epoch {epochs}"
        logging.warning(msg)  # one line (warnings.warn would add a second one with a source line)
        notes.append(msg)
    return Unlock(epoch, tower, new, f"unlock_{tower}@{epoch}")


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


# ---------------------------------------------------------------------------------------------
# speed: a fully frozen image trunk is a pure function of its input


def compile_frozen_trunk(model: nn.Module, enable: bool) -> bool:
    """While every parameter of `model.visual.trunk` is frozen, run it compiled and without
    autograd (`--compile-frozen`); restore the plain forward as soon as any part trains.

    Only the bound `forward` is replaced, so parameter names, checkpoints and the DDP wrapper
    are unaffected. Returns whether the compiled forward is active.
    """
    import torch

    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        return False
    frozen = not any(p.requires_grad for p in trunk.parameters())
    active = "forward" in trunk.__dict__ and getattr(trunk.forward, "_frozen_compiled", False)
    if enable and frozen and not active:
        eager = type(trunk).forward.__get__(trunk)
        compiled = torch.compile(eager, dynamic=None)

        def forward(x, *args, **kwargs):
            with torch.no_grad():
                if forward._failed:
                    return eager(x, *args, **kwargs)
                try:
                    return compiled(x, *args, **kwargs)
                except Exception as e:  # no working compiler toolchain, an unsupported op, ...
                    # Compiling happens at the first call (and at a new input shape): fall back to
                    # the plain forward for the rest of the run instead of failing a long job.
                    forward._failed = True
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    logging.getLogger(__name__).warning(
                        f"compiling the frozen image trunk failed ({type(e).__name__}: {first}); running it eagerly")
                    return eager(x, *args, **kwargs)

        forward._failed = False

        forward._frozen_compiled = True
        trunk.forward = forward
        return True
    if active and not (enable and frozen):
        del trunk.forward  # back to the class's forward: the trunk trains now
        return False
    return active
