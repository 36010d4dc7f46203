#!/usr/bin/env bash
# Seed Part A: ConvNeXtV2-Tiny + GPT2, everything trainable (INIT total=155,329,409).
source "$(dirname "$0")/_launch.sh"
run_recipe "$(basename "$0" .sh)" 2 \
    --model convnextv2_tiny_gpt2-512 --batch-size 192 --epochs 26 --lr 7e-4 --warmup 2200 --accum-freq 1 \
    --pretrained-image --pretrained-image-path "${CONVNEXTV2_TINY_WEIGHTS}" \
    --pretrained-text-path "${GPT2_WEIGHTS}" \
    --text-tokenizer "${GPT2_TOKENIZER}" \
    --unfreeze-new-lr-scale 0.1
