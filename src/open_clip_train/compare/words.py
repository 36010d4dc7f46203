"""A run's settings (params.txt values, ours or upstream's) in words: the freeze / unfreeze
strategy, text tower, teacher, lr and global batch. Missing keys read as upstream's defaults."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

def is_none(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() in ("", "None", "none"))


def as_int(v: Any) -> Optional[int]:
    if is_none(v) or isinstance(v, bool):
        return None
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def as_float(v: Any) -> Optional[float]:
    if is_none(v) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) and not is_none(v)


def as_str(v: Any) -> Optional[str]:
    return None if is_none(v) else str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def fmt_num(x: float) -> str:
    return f"{x:g}"


def _tower_words(s: Mapping[str, Any], tower: str) -> Tuple[bool, Optional[str]]:
    """(locked at start, description or None when it is simply 'locked, never unlocked')."""
    unit = "group" if tower == "image" else "layer"
    lock = as_bool(s.get(f"lock_{tower}"))
    keep = as_int(s.get("lock_image_unlocked_groups" if tower == "image" else "lock_text_unlocked_layers")) or 0
    at = as_int(s.get(f"unfreeze_{tower}_at_epoch"))
    count = as_int(s.get("unlocked_image_groups" if tower == "image" else "unlocked_text_layers"))
    epochs = as_int(s.get("epochs"))
    if not lock:
        words = f"{tower} trainable"
        if at is not None:
            words += f" (unfreeze at epoch {at} has nothing to unlock)"
        return False, words
    words = f"{tower} locked" + (f" except the last {plural(keep, unit)}" if keep else "")
    if at is None:
        return True, (None if not keep else words + ", never unlocked further")
    what = f"all {unit}s" if count is None else plural(count, unit)
    words += f", unlock {what} at epoch {at}"
    if epochs is not None and at >= epochs:
        words += f" (never reached: the run has {epochs} epochs)"
    return True, words


def freeze_in_words(settings: Mapping[str, Any]) -> str:
    """The freeze / unfreeze strategy of a run's settings (params.txt values), in words, e.g.
    "image locked, unlock 4 groups at epoch 5; text locked, unlock 6 layers at epoch 3; new lr x0.1".

    Unlock epochs count completed epochs (the unlock applies from the start of that epoch).
    Missing keys (upstream runs) read as upstream's defaults: nothing locked, no unfreeze."""
    img_locked, img = _tower_words(settings, "image")
    txt_locked, txt = _tower_words(settings, "text")
    if img_locked and txt_locked and img is None and txt is None:
        parts = ["image and text locked, never unlocked"]
    elif not img_locked and not txt_locked and "nothing to unlock" not in f"{img}{txt}":
        parts = ["image and text not locked" if settings.get("lock_pattern") else "nothing locked"]
    else:
        parts = [img or "image locked, never unlocked", txt or "text locked, never unlocked"]
    unlocks = any(as_int(settings.get(f"unfreeze_{t}_at_epoch")) is not None for t in ("image", "text"))
    scale = as_float(settings.get("unfreeze_new_lr_scale"))
    if unlocks and scale is not None:
        ramp = as_int(settings.get("unfreeze_warmup_steps")) or 0
        parts.append(f"new lr x{fmt_num(scale)}" + (f" ramped over {ramp} steps" if ramp else ""))
    patterns = settings.get("lock_pattern")
    if isinstance(patterns, (list, tuple)) and patterns:
        parts.append("also locked: params matching " + ", ".join(f"`{p}`" for p in patterns))
    mults = settings.get("lr_mult")
    if isinstance(mults, (list, tuple)) and mults:
        shown = [f"`{m[0]}` x{fmt_num(float(m[1]))}" if isinstance(m, (list, tuple)) and len(m) == 2 else str(m)
                 for m in mults]
        parts.append("lr mult " + ", ".join(shown))
    return "; ".join(parts)


def text_tower(settings: Mapping[str, Any]) -> str:
    """From the model name: gpt2 / cliptext / CLIP text (upstream's built-in text transformer)."""
    model = (as_str(settings.get("model")) or "").lower()
    if not model:
        return "-"
    kind = "gpt2" if "gpt2" in model else "cliptext" if "cliptext" in model else "CLIP text"
    if as_str(settings.get("pretrained_text_path")):
        kind += " (pretrained_text_path)"
    return kind


def teacher_words(settings: Mapping[str, Any]) -> str:
    """distill / headalign and the teacher, or '-'."""
    teacher = as_str(settings.get("teacher_model")) or as_str(settings.get("distill_model"))
    parts = []
    if as_bool(settings.get("distill")) or as_str(settings.get("distill_model")):
        parts.append("distill")
    head = settings.get("headalign")
    if isinstance(head, str) and not is_none(head) and head.strip().lower() not in ("true", "false", "0", "1"):
        parts.append(f"headalign={head}")
    elif as_bool(head):
        parts.append("headalign")
    if not parts:
        return "-"
    return " + ".join(parts) + (f" (teacher {teacher})" if teacher else "")


def fmt_lr(lr: Optional[float]) -> str:
    if lr is None:
        return "-"
    if lr == 0 or abs(lr) >= 1e-2:
        return f"{lr:g}"
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def global_batch(settings: Mapping[str, Any]) -> Optional[Tuple[int, int, int, int]]:
    """(batch_size, world_size, accum_freq, global batch) or None without a batch size."""
    bs = as_int(settings.get("batch_size"))
    if bs is None:
        return None
    world = as_int(settings.get("world_size")) or 1
    accum = as_int(settings.get("accum_freq")) or 1
    return bs, world, accum, bs * world * accum
