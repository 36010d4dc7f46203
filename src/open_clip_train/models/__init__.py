"""Model layer: our JSON configs (registered with open_clip on import), GPT-2 text towers, weight loading."""
from pathlib import Path

import open_clip

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# open_clip keeps a module-level list of config paths; add ours once so list_models()/get_model_config see them.
if _CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
    open_clip.add_model_config(_CONFIG_DIR)

from .gpt2 import CausalTokenizer, GPT2CLIP, GPT2TextTower  # noqa: E402
from .registry import (  # noqa: E402
    close_model_names,
    create_model,
    get_preprocess,
    get_tokenizer,
    loss_model_kwargs,
    list_models,
)
from .weights import LoadReport  # noqa: E402

__all__ = [
    "loss_model_kwargs",
    "CausalTokenizer",
    "GPT2CLIP",
    "GPT2TextTower",
    "LoadReport",
    "close_model_names",
    "create_model",
    "get_preprocess",
    "get_tokenizer",
    "list_models",
]
