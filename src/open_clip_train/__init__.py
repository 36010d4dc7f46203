"""Trainer package for CLIP models on open_clip. Importing it makes the bundled model configs
(`models/model_configs/*.json`) known to open_clip, so `open_clip.create_model(name)` and
`open_clip.list_models()` see them after `import open_clip_train`, in either import order.

open_clip (and torch under it) takes seconds to import, and `--help`, flag errors and the compare
tool must answer without it; so when open_clip is not imported yet, the configs are registered
right after its import finishes instead of importing it here."""
from __future__ import annotations

import sys
from pathlib import Path

__version__ = '0.1.0'

MODEL_CONFIG_DIR = Path(__file__).parent / "models" / "model_configs"


def register_model_configs() -> None:
    """Add the bundled configs to open_clip's search path (once)."""
    import open_clip

    if MODEL_CONFIG_DIR not in open_clip.factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(MODEL_CONFIG_DIR)


class _RegisterAfterImport:
    """A one-shot import hook: finds `open_clip` as the other finders would and runs
    `register_model_configs` right after the module body has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "open_clip":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            register_model_configs()

        spec.loader.exec_module = exec_module
        return spec


if "open_clip" in sys.modules:
    register_model_configs()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
