"""Which layer groups each tower has: one enumeration per tower, input -> output, used by
locking at start, unlocking at an epoch and lr scaling alike (see the package doc). A tower that
declares its own groups (`layer_groups()`, as the GPT2 tower does) is taken at its word; other
towers are enumerated from their known structure."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch.nn as nn

TOWERS = ("image", "text")
SHARED = ("logit_scale", "logit_bias")
# A video model's frame aggregation (video/model.py): a part of its own, new to both towers, so it
# trains under --lock-image --lock-text (only --lock-pattern / --lr-mult RE=0 freeze it).
VIDEO = "video"
VIDEO_PREFIX = "video_pool."
# CoCa's caption decoder (`text_decoder.*`): a part of its own too. Upstream's CoCa.lock_text_tower
# locks `model.text` only, so the decoder trains under --lock-text here as well.
DECODER = "decoder"
DECODER_PREFIX = "text_decoder."


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


def _declared_layout(tower: str, prefix: str, module: nn.Module) -> TowerLayout:
    """A tower's own `layer_groups()` (param names relative to it, input -> output); whatever
    it leaves out (e.g. the GPT2 tower's mlp projection) is the tower's head."""
    groups = [[f"{prefix}{n}" for n in g] for g in module.layer_groups()]
    grouped = {n for g in groups for n in g}
    head = [n for n in _prefixed(prefix, module) if n not in grouped]
    return TowerLayout(tower, groups, head)


def _image_layout(model: nn.Module) -> TowerLayout:
    visual = model.visual
    if hasattr(visual, "layer_groups"):
        return _declared_layout("image", "visual.", visual)
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
    if text is not None and hasattr(text, "layer_groups"):  # e.g. our GPT2 tower
        return _declared_layout("text", "text.", text)
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


def _decoder_layout(model: nn.Module) -> TowerLayout:
    """CoCa's MultimodalTransformer: one group per layer (its self-attention block and its
    cross-attention block), then [ln_final, text_projection] last, input -> output."""
    dec = model.text_decoder
    groups = [_prefixed(f"{DECODER_PREFIX}resblocks.{i}.", b) + _prefixed(f"{DECODER_PREFIX}cross_attn.{i}.", c)
              for i, (b, c) in enumerate(zip(dec.resblocks, dec.cross_attn))]
    grouped = {n for g in groups for n in g}
    last = [n for n in _prefixed(DECODER_PREFIX, dec) if n not in grouped]
    return TowerLayout(DECODER, [g for g in [*groups, last] if g])


class UnsupportedTower(ValueError):
    """Parameters outside the towers and parts this package knows: the freezing schedule cannot
    place them, so the model is refused before any work (a user error)."""

    def __init__(self, names):
        self.names = list(names)
        parts = sorted({n.split(".")[0] for n in self.names})
        super().__init__(f"{len(self.names)} parameters outside the image and text towers ({', '.join(parts)}; e.g. "
                         f"{self.names[0]}) that this trainer cannot freeze or schedule")


def tower_layout(model: nn.Module) -> Dict[str, TowerLayout]:
    """The layer enumeration of both towers; asserts it covers every parameter exactly once."""
    layouts = {"image": _image_layout(model), "text": _text_layout(model)}
    video = [n for n, _ in model.named_parameters() if n.startswith(VIDEO_PREFIX)]
    if video:
        layouts[VIDEO] = TowerLayout(VIDEO, [], head=video)
    if getattr(model, "text_decoder", None) is not None:
        layouts[DECODER] = _decoder_layout(model)
    seen: Dict[str, str] = {}
    for tower in layouts.values():
        for n in tower.names:
            if n in seen:
                raise RuntimeError(f"parameter {n} is enumerated twice ({seen[n]} and {tower.name})")
            seen[n] = tower.name
    all_names = [n for n, _ in model.named_parameters()]
    uncovered = [n for n in all_names if n not in seen and n not in SHARED]
    if uncovered:
        raise UnsupportedTower(uncovered)
    return layouts


def tower_of(name: str) -> str:
    if name in SHARED:
        return "shared"
    if name.startswith(VIDEO_PREFIX):
        return VIDEO
    if name.startswith(DECODER_PREFIX):
        return DECODER
    return "image" if name.startswith("visual.") else "text"


def count_trainable(model: nn.Module) -> Dict[str, int]:
    """Trainable parameter counts: visual = the image tower, text = the whole text side
    (wherever the tower keeps its params: CLIP's sits at the model's top level); a video model
    also has `video`, its frame aggregation, on a line of its own: it is neither tower's, and
    "lock both towers, train the aggregation" should read as visual=0, text=0, video=N. CoCa's
    caption decoder is counted as `decoder` the same way."""
    counts = {"visual": 0, "text": 0, "total": 0}
    key = {"image": "visual", "text": "text", VIDEO: VIDEO, DECODER: DECODER}
    for n, p in model.named_parameters():
        if tower_of(n) in (VIDEO, DECODER):
            counts.setdefault(tower_of(n), 0)
        if not p.requires_grad:
            continue
        counts["total"] += p.numel()
        tower = key.get(tower_of(n))
        if tower is not None:
            counts[tower] = counts.get(tower, 0) + p.numel()
    return counts


def format_counts(counts: Dict[str, int]) -> str:
    parts = "".join(f", {p}={counts[p]}" for p in (VIDEO, DECODER) if p in counts)
    return f"visual={counts['visual']}, text={counts['text']}{parts}, total={counts['total']}"
