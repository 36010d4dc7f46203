#!/usr/bin/env bash
# Seed Part B: convnext_base_w teacher distillation, both towers locked all run
# (INIT visual=3,856,000 text=0 total=3,856,001).
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 4 \
    --model convnext_base_w_absattn --batch-size 96 --epochs 20 --lr 5e-4 --warmup 1200 --accum-freq 1 \
    --pretrained "$CNBW_CHECKPOINT" \
    --distill --teacher-model convnext_base_w --teacher-pretrained "$CNBW_CHECKPOINT" \
    --lock-image --lock-text \
    --unfreeze-new-lr-scale 0.1
