"""Model layer: our JSON configs (registered with open_clip on import), GPT-2 text towers, weight loading."""
from .. import register_model_configs

register_model_configs()  # a no-op when `import open_clip_train` already did it

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
