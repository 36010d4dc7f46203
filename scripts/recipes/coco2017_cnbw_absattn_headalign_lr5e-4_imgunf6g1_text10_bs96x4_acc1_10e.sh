#!/usr/bin/env bash
# Seed Part B best run: no teacher, head alignment to the checkpoint's own (linear) head;
# image unlocks 1 group at epoch 6; the text unlock at epoch 10 is never reached in 10 epochs
# (as in the seed's params.txt; the trainer warns). INIT visual=3,856,000 text=0 total=3,856,001.
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 4 \
    --model convnext_base_w_absattn --batch-size 96 --epochs 10 --lr 5e-4 --warmup 1000 --accum-freq 1 \
    --pretrained "${CNBW_CHECKPOINT}" \
    --headalign \
    --lock-image --lock-text \
    --unfreeze-image-at-epoch 6 --unlocked-image-groups 1 \
    --unfreeze-text-at-epoch 10 \
    --unfreeze-new-lr-scale 0.05
