#!/usr/bin/env bash
# The GPU checks, in one go (under 8 minutes on one GPU), results to benchmarks/results-gpu.md:
#
#   bash scripts/gpu_check.sh           # run everything
#   bash scripts/gpu_check.sh --plan    # print the commands it would run, run nothing
#
#   1. demo         the demo recipe (lock -> unlock, retrieval) with --precision amp on CUDA
#   2. torchrun     the same through `torchrun --nproc_per_node 1`, --dist-backend nccl
#   3. torchcompile the same with --torchcompile
#   4. benchmark    ours vs upstream on convnextv2_tiny_cliptext-512, batch 128, amp:
#                   full, lock-image, lock-both (benchmarks/bench_train.py)
#   5. host-sync    the same model: CUDA syncs per training step by call site, and the step's
#                   time against reading the step agreement within the step (benchmarks/bench_host_sync.py)
#
# Without CUDA it stops at once with an error and exit code 2: it never skips a check or writes
# CPU figures as GPU ones. Every check runs even if an earlier one failed; the exit code is 1 if
# any failed. Environment: PYTHON (default .venv/bin/python; on a machine without the venv, e.g.
# offline: PYTHON=python3 PYTHONPATH=src:DIR with the pinned requirements installed in DIR by
# `pip install --no-deps --target DIR`), UPSTREAM_VENV (upstream's trainer; default: the same
# interpreter and packages without this checkout, so `open_clip_train` is open_clip_torch's copy),
# GPU_CHECK_WORK (default benchmarks/work-gpu), GPU_CHECK_STEP_TIMEOUT (seconds per training check,
# default 150; the benchmark gets 330).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-.venv/bin/python}"
WORK="${GPU_CHECK_WORK:-benchmarks/work-gpu}"
case "$WORK" in /*) ;; *) WORK="$REPO/$WORK" ;; esac
OUT="benchmarks/results-gpu.md"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-150}"
BENCH_TIMEOUT=330
PLAN=0
case "${1:-}" in
    --plan) PLAN=1 ;;
    "") ;;
    *) echo "gpu_check: error: unknown argument '$1' (use --plan or nothing)" >&2; exit 2 ;;
esac

DATA="$WORK/demo_data"
COMMON=(--model tiny-convnext-cliptext --dataset-type coco
        --train-data "$DATA/annotations/captions_train2017.json"
        --val-data "$DATA/annotations/captions_val2017.json"
        --epochs 2 --batch-size 64 --lr 2e-3 --wd 0.1 --warmup 10 --workers 2 --precision amp --device cuda
        --lock-image --unfreeze-image-at-epoch 1 --unfreeze-new-lr-scale 0.5 --val-at-start
        --log-every-n-steps 5 --seed 0 --log-dir "$WORK/logs")
DATA_CMD=("$PY" -m open_clip_train.demo_data "$DATA" --num-train 1024 --num-val 128 --image-size 64 --seed 0)
DEMO_CMD=("$PY" -m open_clip_train.main "${COMMON[@]}" --name demo-amp)
TORCHRUN_CMD=("$PY" -m torch.distributed.run --nproc_per_node 1 -m open_clip_train.main "${COMMON[@]}"
              --dist-backend nccl --name torchrun-nccl)
COMPILE_CMD=("$PY" -m open_clip_train.main "${COMMON[@]}" --torchcompile --name torchcompile)
BENCH_CMD=("$PY" benchmarks/bench_train.py --device cuda --batch-size 128 --precision amp
           --settings full,lock-image,lock-both --repeats 1 --steps 25 --skip 5 --workers 4 --max-wait 0
           --work-dir "$WORK/bench" --out "$WORK/bench-results")
SYNC_CMD=("$PY" benchmarks/bench_host_sync.py --device cuda --model convnextv2_tiny_cliptext-512 --batch-size 128
          --precision amp --steps 40 --log-every 10 --workers 4 --out "$WORK/host-sync")

# The benchmark's two interpreters (it clears PYTHONPATH for its children, so each shim sets its
# own): ours finds this checkout's src/ first; upstream's is the same interpreter and packages
# without this checkout and without site processing (an editable install's .pth would add src/).
interpreter_paths() {  # prints ours' and upstream's PYTHONPATH, one a line
    "$PY" -c '
import os, sys
src = os.path.realpath(sys.argv[1])
rest = [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) != src]
print(os.pathsep.join([src] + rest))
print(os.pathsep.join(rest))' "$REPO/src"
}
write_shim() {  # write_shim PATH PYTHONPATH [python flags]: an executable that runs $PY so
    local path=$1 pypath=$2; shift 2
    mkdir -p "$(dirname "$path")"
    printf '#!/bin/sh\nexec env PYTHONPATH=%q %q %s "$@"\n' "$pypath" "$REAL_PY" "$*" >"$path"
    chmod +x "$path"
}

if [ "$PLAN" = 1 ]; then
    for c in DATA_CMD DEMO_CMD TORCHRUN_CMD COMPILE_CMD BENCH_CMD SYNC_CMD; do
        declare -n cmd="$c"
        printf '%s\n' "$(printf '%q ' "${cmd[@]}")"
    done
    if [ -n "${GPU_CHECK_PLAN_SHIMS:-}" ]; then  # write the interpreter shims there, to look at them
        REAL_PY="$("$PY" -c 'import sys; print(sys.executable)')"
        { read -r OURS_PATH; read -r UP_PATH; } < <(interpreter_paths)
        write_shim "$GPU_CHECK_PLAN_SHIMS/ours/bin/python" "$OURS_PATH"
        write_shim "$GPU_CHECK_PLAN_SHIMS/upstream/bin/python" "$UP_PATH" -S
    fi
    exit 0
fi

# ---- no GPU: fail loudly, before any work
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: error: no NVIDIA driver (nvidia-smi not found); these checks need a CUDA GPU, run them on a GPU machine" >&2
    exit 2
fi
DEVICE="$("$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: error: torch.cuda.is_available() is False (torch " + torch.__version__ + "); these checks need a CUDA GPU")
print(torch.cuda.get_device_name(0) + " | torch " + torch.__version__ + " | CUDA " + str(torch.version.cuda))')" || exit 2

mkdir -p "$WORK"
rm -rf "$WORK/logs"
START=$(date +%s)
declare -a ROWS
FAILED=0

run_step() {  # name, timeout, then the command; logs to $WORK/<name>.log, one table row
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s) rc
    echo "== $name: $*"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local status="ok"
    [ "$rc" = 0 ] || { status="FAILED (exit $rc$([ "$rc" = 124 ] && echo ', timed out'))"; FAILED=1; }
    local detail
    detail="$(grep -hoE '(samples/s|[0-9.]+/s/gpu|coco_mean_recall[^,]*|error: .*)' "$WORK/$name.log" | tail -1 | cut -c1-100)"
    ROWS+=("| $name | $status | ${dt}s | ${detail//|//} |")
    echo "   $status in ${dt}s"
}

REAL_PY="$("$PY" -c 'import sys; print(sys.executable)')"
{ read -r OURS_PATH; read -r UP_PATH; } < <(interpreter_paths)
export OURS_PYTHON="$WORK/ours-shim/bin/python"
write_shim "$OURS_PYTHON" "$OURS_PATH"
UPSTREAM_NOTE=""
if [ -z "${UPSTREAM_VENV:-}" ] && [ ! -x benchmarks/.venv-upstream/bin/python ]; then
    export UPSTREAM_VENV="$WORK/upstream-shim"
    write_shim "$UPSTREAM_VENV/bin/python" "$UP_PATH" -S
    UPSTREAM_NOTE="upstream's trainer ran from the same interpreter and packages without this checkout (its open_clip_train)"
fi

run_step data "$STEP_TIMEOUT" "${DATA_CMD[@]}"
run_step demo-amp "$STEP_TIMEOUT" "${DEMO_CMD[@]}"
run_step torchrun-nccl "$STEP_TIMEOUT" "${TORCHRUN_CMD[@]}"
run_step torchcompile "$STEP_TIMEOUT" "${COMPILE_CMD[@]}"
run_step benchmark "$BENCH_TIMEOUT" "${BENCH_CMD[@]}"
run_step host-sync "$STEP_TIMEOUT" "${SYNC_CMD[@]}"

{
    echo "# GPU check"
    echo
    echo "Device: $DEVICE. Run $(date -u +%Y-%m-%dT%H:%MZ) by \`scripts/gpu_check.sh\` in $(( $(date +%s) - START ))s."
    echo
    echo "| check | result | time | last figure |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    grep -h "world: backend" "$WORK/torchrun-nccl.log" 2>/dev/null | tail -1 | sed 's/^.*| INFO | /torchrun: /'
    [ -n "$UPSTREAM_NOTE" ] && echo && echo "Benchmark: $UPSTREAM_NOTE."
    if [ -f "$WORK/host-sync.md" ]; then
        echo
        echo "## Host synchronisation (benchmarks/bench_host_sync.py)"
        echo
        cat "$WORK/host-sync.md"
    fi
    if [ -f "$WORK/bench-results.md" ]; then
        echo
        echo "## Benchmark (benchmarks/bench_train.py, batch 128, amp)"
        echo
        sed 's/^#/##/' "$WORK/bench-results.md"
    fi
} >"$OUT"
echo "wrote $OUT"
exit "$FAILED"
