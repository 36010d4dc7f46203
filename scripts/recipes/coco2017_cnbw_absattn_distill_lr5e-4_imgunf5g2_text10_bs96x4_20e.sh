#!/usr/bin/env bash
# Seed Part B: distillation, image unlocks 2 groups at epoch 8, text at epoch 18, new lr x0.05
# (INIT visual=3,856,000 text=0 total=3,856,001).
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 4 \
    --model convnext_base_w_absattn --batch-size 96 --epochs 20 --lr 5e-4 --warmup 1200 --accum-freq 1 \
    --pretrained "$CNBW_CHECKPOINT" \
    --distill --teacher-model convnext_base_w --teacher-pretrained "$CNBW_CHECKPOINT" \
    --lock-image --lock-text \
    --unfreeze-image-at-epoch 8 --unlocked-image-groups 2 \
    --unfreeze-text-at-epoch 18 \
    --unfreeze-new-lr-scale 0.05
