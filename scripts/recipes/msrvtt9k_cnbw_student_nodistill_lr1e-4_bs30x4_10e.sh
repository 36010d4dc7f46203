#!/usr/bin/env bash
# Seed TeachClip student, MSR-VTT 9k, 10 epochs, without its teacher for now (the distillation terms come later):
# the contrastive loss only. TeachCLIP's optimiser: lr 1e-4, AFA at 10x, the pretrained towers at
# 1e-3x (coef_lr), batch 120 (4 x 30), clip-norm 1.0, warmup-cosine.
source "$(dirname "$0")/_launch.sh"
run_video_recipe "$(basename "$0" .sh)" 4 \
    --model convnext_base_w --pretrained "$CNBW_CHECKPOINT" --batch-size 30 --epochs 10 --lr 1e-4 --warmup 300 \
    --msrvtt-train-split 9k \
    --lr-mult 'video_pool\.afa\.=10' --lr-mult '^visual\.=0.001' \
    --lr-mult '^(token_embedding|positional_embedding|transformer|ln_final|text_projection)=0.001'
