"""Install this trainer *editable* so that it wins over the copy of `open_clip_train`
bundled inside the open_clip_torch wheel.

Why: open_clip_torch ships its own top-level `open_clip_train` package in site-packages.
A normal editable install only *appends* `src/` to sys.path, after site-packages, so
upstream's copy would shadow ours; a normal (non-editable) install would overwrite
upstream's files. We therefore:

* add a second `.pth` file to the editable wheel that moves `src/` to the *front* of
  sys.path at interpreter start-up (python -m, torchrun workers, pytest, scripts alike);
* refuse non-editable builds with a clear message instead of clobbering open_clip_torch.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
PTH_NAME = "open_clip_train_first.pth"
# A .pth line starting with "import" is executed by site.py at start-up.
PTH_LINE = "import sys; p = {src!r}; p in sys.path and sys.path.remove(p); sys.path.insert(0, p)\n"


class _PrependSrc:
    """Wraps setuptools' editable strategy and adds our precedence .pth to the wheel."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.format(src=str(SRC)).encode())

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


class editable_wheel_src_first(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _PrependSrc(super()._select_strategy(*args, **kwargs))


class build_py_editable_only(build_py):
    def run(self):
        if not getattr(self, "editable_mode", False):
            raise SystemExit(
                "error: install this project editable (`pip install -e .`): a regular install "
                "would overwrite the open_clip_train package bundled in open_clip_torch"
            )
        super().run()


def _requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-"))]


setup(
    name="open_clip_train_convnext",
    version="0.1.0",
    description="OpenCLIP trainer extension: ConvNeXt towers, controlled freezing, distillation",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"open_clip_train": ["models/model_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=_requirements(),
    cmdclass={"editable_wheel": editable_wheel_src_first, "build_py": build_py_editable_only},
)
