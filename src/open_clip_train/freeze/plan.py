"""The freezing plan: for every parameter, per epoch, whether it trains and at which lr
multiplier, built from the flags' config and the towers' layouts (`build_plan`)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from ..errors import UserError, flag
from .layout import DECODER, TOWERS, VIDEO, TowerLayout, tower_layout, tower_of

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
        ("image", "lock"): flag("lock_image"),
        ("text", "lock"): flag("lock_text"),
        ("image", "at"): flag("unfreeze_image_at_epoch"),
        ("text", "at"): flag("unfreeze_text_at_epoch"),
        ("image", "n"): flag("unlocked_image_groups"),
        ("text", "n"): flag("unlocked_text_layers"),
        ("image", "start_n"): flag("lock_image_unlocked_groups"),
        ("text", "start_n"): flag("lock_text_unlocked_layers"),
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
            raise UserError(f"{flag('lr_mult')} {p}={mult}: the multiplier must be >= 0 (0 freezes)")
    pattern_hits = {p: [n for n in names if re.search(p, n)] for p in cfg.lock_patterns}
    for p, hit in pattern_hits.items():
        if not hit:
            raise UserError(f"{flag('lock_pattern')} {p!r} matches no parameter; check the names with {flag('dry_run')}")
    seen_mults: Dict[str, float] = {}
    for p, mult in cfg.lr_mults:
        if p in seen_mults:
            raise UserError(f"{flag('lr_mult')} pattern {p!r} is given twice ({seen_mults[p]:g} and {mult:g}); give it once")
        seen_mults[p] = mult
    mult_hits = [[n for n in names if re.search(p, n)] for p, _ in cfg.lr_mults]
    for (p, _), hit in zip(cfg.lr_mults, mult_hits):
        if not hit:
            raise UserError(f"{flag('lr_mult')} pattern {p!r} matches no parameter; check the names with {flag('dry_run')}")
    if cfg.new_lr_scale < 0:
        raise UserError(f"{flag('unfreeze_new_lr_scale')} must be >= 0 (got {cfg.new_lr_scale})")

    frozen_start: set = set()
    never: set = {n for n in names if _lr_mult(n, cfg.lr_mults) == 0}
    if never:
        notes.append(f"{flag('lr_mult')} ...=0 freezes {len(never)} params for the whole run")
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
        notes.append(f"shared: froze {', '.join(sorted(shared_by_pattern))} by {flag('lock_pattern')}")
    for part in (VIDEO, DECODER):  # no lock flag of their own: only a pattern freezes them
        part_by_pattern = {n for hit in pattern_hits.values() for n in hit if tower_of(n) == part}
        if part_by_pattern:
            notes.append(f"{part}: froze {len(part_by_pattern)} params by {flag('lock_pattern')}")
            shared_by_pattern |= part_by_pattern
    frozen_start |= never | shared_by_pattern
    base = {n: ParamRule("base", _lr_mult(n, cfg.lr_mults), 0) for n in names if n not in frozen_start}
    plan = FreezePlan(layouts, base, unlocks, epochs, notes, cfg)

    # An --lr-mult that only touches parameters frozen for the whole run is a mistake.
    ever_trainable = set(base) | {n for u in unlocks for n in u.names}
    for (p, mult), hit in zip(cfg.lr_mults, mult_hits):
        if mult != 0 and not any(n in ever_trainable for n in hit):
            raise UserError(f"{flag('lr_mult')} {p}={mult} only matches parameters that stay frozen all run")
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
            notes.append(f"{tower}: {flag('lock_pattern')} wins over {_flag(tower, 'lock')} (pattern > layer count > whole tower)")
        notes.append(f"{tower}: froze {len(by_pattern)} params by {flag('lock_pattern')}")
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
            f"(add {_flag(tower, 'lock')} or a {flag('lock_pattern')} for it)"
        )
    if epoch < 1:
        raise UserError(f"{_flag(tower, 'at')} must be >= 1 (completed epochs before the unlock), got {epoch}")
    if epoch > epochs:
        raise UserError(f"{_flag(tower, 'at')} {epoch} is beyond the run ({flag('epochs')} {epochs})")
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
