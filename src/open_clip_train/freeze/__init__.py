"""Freezing as data (layout: the towers' layer groups; plan: what trains when; apply: onto a
live model): which parameters train, in which param group, at which lr scale, per epoch.

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

from .apply import apply_trainable, freeze_bn_stats, frozen_modules, install_frozen_eval
from .layout import SHARED, TOWERS, TowerLayout, count_trainable, format_counts, tower_layout, tower_of
from .plan import FreezeCfg, FreezePlan, ParamRule, Phase, TowerSchedule, Unlock, build_plan

__all__ = ["SHARED", "TOWERS", "FreezeCfg", "FreezePlan", "ParamRule", "Phase", "TowerLayout", "TowerSchedule", "Unlock",
           "apply_trainable", "build_plan", "count_trainable", "format_counts", "freeze_bn_stats", "frozen_modules",
           "install_frozen_eval", "tower_layout", "tower_of"]
