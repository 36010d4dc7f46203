#!/usr/bin/env bash
# Seed Part A: both towers locked; text unlocks 6 layers at epoch 3, image 4 groups at epoch 5
# (INIT visual=2,203,904 text=819,200 total=3,023,105).
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 2 \
    --model convnextv2_tiny_gpt2-512 --batch-size 192 --epochs 26 --lr 7e-4 --warmup 2400 --accum-freq 1 \
    --pretrained-image --pretrained-image-path "${CONVNEXTV2_TINY_WEIGHTS}" \
    --pretrained-text-path "${GPT2_WEIGHTS}" \
    --text-tokenizer "${GPT2_TOKENIZER}" \
    --lock-image --lock-text \
    --unfreeze-text-at-epoch 3 --unlocked-text-layers 6 \
    --unfreeze-image-at-epoch 5 --unlocked-image-groups 4 \
    --unfreeze-new-lr-scale 0.1
