#!/usr/bin/env bash
# Create the virtualenv that runs UPSTREAM's trainer (open_clip_torch==3.3.0's bundled
# `open_clip_train`) for the side-by-side benchmark.
#
#   bash benchmarks/setup_upstream_env.sh [VENV_DIR]
#
# VENV_DIR defaults to $UPSTREAM_VENV, else benchmarks/.venv-upstream. It must be a separate
# environment: this repo's package is also called `open_clip_train` and, installed, takes
# precedence over the copy inside the open_clip_torch wheel. So this venv gets open_clip_torch
# and the libraries its trainer imports, and NOT this repository's package.
#
# Versions: every library both trainers share is taken with the exact pin from
# requirements.txt (torch, torchvision, timm, numpy, pillow, ...), so both run the same kernels.
# Upstream's trainer also imports pandas, braceexpand and fsspec at start-up; those are pinned
# below (pandas only loads, it does no work in these runs).
# Idempotent: re-running only installs what is missing or at the wrong version.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${1:-${UPSTREAM_VENV:-$HERE/.venv-upstream}}"
PYTHON="${PYTHON:-python3}"

# Shared with our trainer: pins read from requirements.txt so they cannot drift apart.
SHARED="torch torchvision open_clip_torch timm safetensors huggingface_hub webdataset numpy pillow ftfy regex"
# Only upstream's trainer imports these (not in requirements.txt).
EXTRA=("pandas==2.3.3" "braceexpand==0.1.7" "fsspec==2026.9.0" "tqdm==4.70.1")

pins=()
for name in $SHARED; do
    line="$(grep -iE "^${name}==" "$REPO/requirements.txt" || true)"
    if [ -z "$line" ]; then
        echo "setup_upstream_env: no pin for $name in requirements.txt" >&2
        exit 1
    fi
    pins+=("$line")
done

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=23.1"
# torch/torchvision first, on their own, so the resolver never swaps in another torch build.
"$VENV/bin/python" -m pip install --quiet $(printf '%s\n' "${pins[@]}" | grep -iE '^torch(vision)?==')
"$VENV/bin/python" -m pip install --quiet "${pins[@]}" "${EXTRA[@]}"

# Check: the trainer that `python -m open_clip_train.main` runs must be the wheel's copy.
"$VENV/bin/python" - <<'EOF'
import sys
import open_clip, open_clip_train, torch
path = open_clip_train.__file__.replace("\\", "/")
if "/site-packages/open_clip_train/" not in path:
    sys.exit(f"upstream venv: open_clip_train resolves to {path}, not open_clip_torch's copy")
import open_clip_train.main  # noqa: F401  (all of upstream's start-up imports)
print(f"upstream venv ready: open_clip {open_clip.__version__}, torch {torch.__version__}, trainer {path}")
EOF
