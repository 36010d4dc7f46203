#!/usr/bin/env bash
# Seed Part B baseline: ConvNeXt-Base-W with attention pool + 640x640 projection (the variant this
# run used: INIT visual=4,265,600 total=4,265,601); image 2 groups at epoch 3, text at epoch 8.
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 2 \
    --model convnext_base_w_absattn_proj --batch-size 192 --epochs 10 --lr 2e-5 --warmup 1000 --accum-freq 1 \
    --pretrained "${CNBW_CHECKPOINT}" \
    --lock-image --lock-text \
    --unfreeze-image-at-epoch 3 --unlocked-image-groups 2 \
    --unfreeze-text-at-epoch 8 \
    --unfreeze-new-lr-scale 0.2
