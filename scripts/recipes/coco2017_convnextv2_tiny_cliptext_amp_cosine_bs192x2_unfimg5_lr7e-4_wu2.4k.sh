#!/usr/bin/env bash
# Seed Part A: ConvNeXtV2-Tiny + CLIP text; image locked, 4 groups unlocked at epoch 5
# (INIT visual=2,203,904 text=63,428,096 total=65,632,001; the seed's log said text=0).
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 2 \
    --model convnextv2_tiny_cliptext-512 --batch-size 192 --epochs 26 --lr 7e-4 --warmup 2400 --accum-freq 1 \
    --pretrained-image --pretrained-image-path "${CONVNEXTV2_TINY_WEIGHTS}" \
    --lock-image --unfreeze-image-at-epoch 5 --unlocked-image-groups 4 \
    --unfreeze-new-lr-scale 0.1
