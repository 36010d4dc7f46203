#!/usr/bin/env bash
# Seed TeachClip student, MSR-VTT 7k, 16 epochs, both encoders locked (alignment heads and frame
# aggregation train).
# Distilled from an X-CLIP teacher (TeachCLIP: coarse pear + fine ce, default weights) whose
# features are extracted once into a teacher cache, then read by id (DISTILL=0: the contrastive
# loss only; LIVE_TEACHER=1: no cache; knobs in _launch.sh). The locked encoders' outputs are
# cached too (FROZEN_CACHE: computed once before the first epoch, then read; ~50x faster epochs).
# TeachCLIP's optimiser: lr 1e-4, AFA at 10x, the pretrained towers at 1e-3x (coef_lr), batch 120
# (4 x 30), clip-norm 1.0, warmup-cosine.
source "$(dirname "$0")/_launch.sh"
run_video_distill_recipe "$(basename "$0" .sh)" 4 7k \
    --model convnext_base_w --pretrained "$CNBW_CHECKPOINT" --batch-size 30 --epochs 16 --lr 1e-4 --warmup 300 \
    --msrvtt-train-split 7k \
    --lr-mult 'video_pool\.afa\.=10' --lock-image --lock-text
