"""The comparison's curves as one PNG (needs matplotlib, imported only here)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .runs import Run, TrainPoint
from .words import global_batch

def loss_curve(points: Sequence[TrainPoint],
               gbatch: Optional[int]) -> Tuple[List[int], Dict[str, List[float]], Optional[int]]:
    """(steps, {loss name: values}, steps per epoch or None). Lines with `step N` use it; upstream
    lines (no step) get epoch * steps_per_epoch + samples / global batch, where steps_per_epoch =
    samples_per_epoch // global batch. Without a global batch (no params.txt) it is estimated as the
    gcd of the logged sample counters, which is a multiple of the true one."""
    if not points:
        return [], {}, None
    if gbatch is None:
        g = 0
        for p in points:
            g = math.gcd(g, p.samples)
        gbatch = g or 1
    spe = max(1, points[-1].samples_per_epoch // gbatch)
    steps = [p.step if p.step is not None else p.epoch * spe + p.samples // gbatch for p in points]
    names = sorted({n for p in points for n in p.losses})
    if "loss" in names and len(names) == 2:  # upstream's total equals its only term: plot that once
        names.remove("loss")
    series = {n: [p.losses.get(n, float("nan")) for p in points] for n in names}
    return steps, series, spe


def short_names(names: Sequence[str], width: int = 28) -> List[str]:
    """Legend labels: the run names without the prefix and suffix they all share (cut at a
    separator, so `lock_image_unf6` and `lock_both_unf6` become `image` and `both`), each at most
    `width` characters (the middle elided). Names that would then clash keep their full form."""
    if len(names) > 1:
        head, tail = _common_affix(names), _common_affix([n[::-1] for n in names])[::-1]
        cut = [n[len(head): len(n) - len(tail)] or n for n in names]
        if len(set(cut)) == len(cut):
            names = cut
    return [n if len(n) <= width else n[: (width - 1) // 2] + "\u2026" + n[len(n) - width // 2:] for n in names]


def _common_affix(names: Sequence[str]) -> str:
    """The longest common prefix of `names` that ends at a separator (or is empty)."""
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    cut = max((prefix.rfind(c) for c in "_-/. "), default=-1)
    return prefix[: cut + 1] if cut >= 0 else ""


def plot(runs: Sequence[Run], out: Path) -> None:
    """One PNG: I2T R@1 and T2I R@1 vs epoch (COCO when present, else pairwise, labelled), and the
    training losses vs step, with dotted lines at each run's unlock epochs. The legend sits below
    the axes (a colour per run, short names; a line style per loss term), off the curves."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), dpi=100)
    ax_i2t, ax_t2i, ax_loss = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    labels = short_names([r.name for r in runs])
    handles, loss_styles = [], {}
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = colors[i % len(colors)]
        protocol = "coco" if run.protocols.get("coco") else "pairwise" if run.protocols.get("pairwise") else None
        unlocks = run.unlock_epochs
        if protocol is not None:
            s = run.protocols[protocol]
            label += "" if protocol == "coco" else " (pairwise, upstream)"
            epochs = [e.epoch for e in s.curve]
            for ax, d in ((ax_i2t, "i2t"), (ax_t2i, "t2i")):
                ax.plot(epochs, [100 * e.recall[f"{d}_r1"] for e in s.curve], marker="o", markersize=3,
                        color=color, linestyle="-" if protocol == "coco" else "--")
        handles.append(Line2D([], [], color=color, marker="o", markersize=3, label=label))
        gb = global_batch(run.settings)
        steps, series, spe = loss_curve(run.log.points if run.log else [], gb[3] if gb else None)
        for name, values in series.items():
            style = loss_styles.setdefault(name, styles[len(loss_styles) % len(styles)])
            ax_loss.plot(steps, values, color=color, linestyle=style, linewidth=1)
        # an unlock is marked where the run got that far (a run stopped early has no marker past its end)
        last_epoch = max([e.epoch for s in run.protocols.values() if s for e in s.curve], default=None)
        marks = [(ax_i2t, 1, last_epoch), (ax_t2i, 1, last_epoch)]
        if spe and steps:
            marks.append((ax_loss, spe, max(steps)))
        for epoch, towers in sorted(unlocks.items()):
            for ax, scale, end in marks:
                x = epoch * scale
                if end is None or x > end:
                    continue
                ax.axvline(x, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
                ax.text(x, 0.99 - 0.05 * (i % 8), "unlock " + "+".join(towers), color=color, fontsize=7,
                        rotation=90, va="top", ha="right",
                        transform=blended_transform_factory(ax.transData, ax.transAxes))
    if len(loss_styles) > 1:
        handles += [Line2D([], [], color="black", linestyle=st, linewidth=1, label=f"loss: {name}")
                    for name, st in loss_styles.items()]
    titles = ("I2T R@1 (%) vs epoch", "T2I R@1 (%) vs epoch", "training loss vs step")
    for ax, title, xlabel in zip(axes, titles, ("epoch", "epoch", "step")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ncol = min(len(handles), 4) or 1
    rows = math.ceil(len(handles) / ncol)
    legend_h = (0.15 + 0.2 * rows) / fig.get_figheight()  # inches -> figure fraction
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("solid: COCO protocol; dashed: pairwise (upstream) metrics, not comparable; dotted: unlock epochs",
                 fontsize=9)
    fig.tight_layout(rect=(0, legend_h, 1, 0.96))
    try:
        fig.savefig(out)
    except OSError as e:
        raise UserError(f"cannot write --plot {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
