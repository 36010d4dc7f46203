#!/usr/bin/env bash
# Shared launcher for the recipes in this folder: every knob is an environment variable.
#
#   NPROC_PER_NODE  processes (GPUs) per node        (default: the recipe's world size)
#   NNODES          nodes                             (default 1)
#   NODE_RANK       this node's rank                  (default 0)
#   MASTER_ADDR     rendezvous host                   (default 127.0.0.1)
#   MASTER_PORT     rendezvous port                   (default 29500)
#   COCO_ROOT       COCO root with annotations/, train2017/, val2017/
#   MSRVTT_ROOT     video recipes: folder with MSRVTT_data.json, the split csvs and videos/
#   FRAMES_ROOT     video recipes: a frame store (python -m open_clip_train.extract_frames); unset: decode mp4s
#   VIDEO_POOLING   video recipes: mean | seqtransf | afa | seqtransf-afa (default seqtransf-afa)
#   LOG_DIR         where runs go                     (default ./logs)
#   WORKERS         data-loader workers per process   (default 8)
#   DRY_RUN=1       print the freezing schedule and trainable counts, read no data
#                   (video recipes also print the teacher-cache extraction command they would run)
#   DISTILL         video recipes: 1 (default) distil from the teacher (TeachCLIP), 0 the contrastive loss only
#   TEACHER_MODEL   video recipes: xclip (default) or a model config applied per frame
#   TEACHER_PRETRAINED  the teacher's weights (default /weights/xclip/msrvtt<split>.bin)
#   TEACHER_CACHE   where its features are extracted once, then read (default ./teacher_cache/msrvtt<split>-<model>);
#                   extracted only when it holds no cache yet (REEXTRACT=1 replaces it)
#   TEACHER_DTYPE   float16 (default) | float32 features in the cache
#   LIVE_TEACHER=1  run the teacher on every batch instead of extracting a cache
#   FROZEN_CACHE    video recipes with both encoders locked: where the locked encoders' per-frame and
#                   per-caption outputs are computed once and then read (--frozen-feature-cache; default
#                   ./frozen_cache/<run name>); FROZEN_CACHE=none runs the encoders on every batch.
#                   Not with LIVE_TEACHER=1 (the live teacher needs the frames themselves).
#   EXTRA_ARGS      appended to the trainer's command line
# Weights (only the ones a recipe uses): CONVNEXTV2_TINY_WEIGHTS (timm safetensors),
# GPT2_WEIGHTS (HF dir or model.safetensors), GPT2_TOKENIZER (HF tokenizer dir),
# CNBW_CHECKPOINT (open_clip convnext_base_w checkpoint, e.g. open_clip_pytorch_model.bin).
set -euo pipefail

: "${CONVNEXTV2_TINY_WEIGHTS:=/weights/convnextv2_tiny/model.safetensors}"
: "${GPT2_WEIGHTS:=/weights/gpt2/model.safetensors}"
: "${GPT2_TOKENIZER:=/weights/gpt2}"
: "${CNBW_CHECKPOINT:=/weights/CLIP-convnext_base_w-laion2B-s13B-b82K/open_clip_pytorch_model.bin}"
MSRVTT_FRAMES=12  # CLIP4Clip's max_frames / max_words: the trainer and the teacher cache must agree
MSRVTT_WORDS=32

run_recipe() {  # run_recipe NAME WORLD_SIZE trainer-args...
    local name=$1 world=$2
    shift 2
    local common=(
        --dataset-type coco
        --train-data "${COCO_ROOT:-/data/coco}/annotations/captions_train2017.json"
        --val-data "${COCO_ROOT:-/data/coco}/annotations/captions_val2017.json"
        --workers "${WORKERS:-8}" --lr-scheduler cosine --wd 0.2 --precision amp
        --log-dir "${LOG_DIR:-./logs}" --name "$name" --resume latest
    )
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        python -m open_clip_train.main "$@" "${common[@]}" --dry-run ${EXTRA_ARGS:-}
        return
    fi
    torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --nproc_per_node "${NPROC_PER_NODE:-$world}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        -m open_clip_train.main "$@" "${common[@]}" ${EXTRA_ARGS:-}
}

run_video_recipe() {  # run_video_recipe NAME WORLD_SIZE trainer-args...: MSR-VTT (1k-A test), same knobs
    local name=$1 world=$2
    shift 2
    local root=${MSRVTT_ROOT:-/data/msrvtt}
    local video=(
        --dataset-type msrvtt --train-data "$root" --val-data "$root" --msrvtt-test 1k-A
        --max-frames "$MSRVTT_FRAMES" --max-words "$MSRVTT_WORDS" --video-pooling "${VIDEO_POOLING:-seqtransf-afa}"
        --workers "${WORKERS:-8}" --lr-scheduler cosine --wd 0.2 --grad-clip-norm 1.0 --precision amp
        --log-dir "${LOG_DIR:-./logs}" --name "$name" --resume latest
    )
    if [[ -n "${FRAMES_ROOT:-}" ]]; then
        video+=(--frames-root "$FRAMES_ROOT")
    fi
    if [[ " $* " == *" --lock-image "* && " $* " == *" --lock-text "* && "${FROZEN_CACHE:-}" != none \
          && "${LIVE_TEACHER:-0}" != 1 ]]; then
        video+=(--frozen-feature-cache "${FROZEN_CACHE:-./frozen_cache/$name}")
    fi
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        python -m open_clip_train.main "$@" "${video[@]}" --dry-run ${EXTRA_ARGS:-}
        return
    fi
    torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --nproc_per_node "${NPROC_PER_NODE:-$world}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        -m open_clip_train.main "$@" "${video[@]}" ${EXTRA_ARGS:-}
}

run_video_distill_recipe() {  # run_video_distill_recipe NAME WORLD_SIZE SPLIT trainer-args...: TeachCLIP
    # (the run is named NAME-distill-<teacher model> so that --resume latest never mixes it with DISTILL=0's)
    local name=$1 world=$2 split=$3
    shift 3
    if [[ "${DISTILL:-1}" != 1 ]]; then
        run_video_recipe "$name" "$world" "$@"
        return
    fi
    local model=${TEACHER_MODEL:-xclip}
    local weights=${TEACHER_PRETRAINED:-/weights/xclip/msrvtt${split}.bin}
    if [[ "${LIVE_TEACHER:-0}" == 1 ]]; then
        run_video_recipe "$name-distill-$model" "$world" "$@" --distill --teacher-model "$model" \
            --teacher-pretrained "$weights"
        return
    fi
    local cache=${TEACHER_CACHE:-./teacher_cache/msrvtt${split}-${model}}
    local extract=(
        -m open_clip_train.extract_teacher --dataset-type msrvtt --train-data "${MSRVTT_ROOT:-/data/msrvtt}"
        --msrvtt-train-split "$split" --max-frames "$MSRVTT_FRAMES" --max-words "$MSRVTT_WORDS" --teacher-model "$model"
        --teacher-pretrained "$weights" --out "$cache" --dtype "${TEACHER_DTYPE:-float16}" --workers "${WORKERS:-8}"
    )
    if [[ -n "${FRAMES_ROOT:-}" ]]; then
        extract+=(--frames-root "$FRAMES_ROOT")
    fi
    if [[ "${REEXTRACT:-0}" == 1 ]]; then
        extract+=(--overwrite)
    fi
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "teacher cache: would run (unless $cache/manifest.json exists): python ${extract[*]}"
    elif [[ "${REEXTRACT:-0}" == 1 || ! -f "$cache/manifest.json" ]]; then
        torchrun --nnodes 1 --nproc_per_node "${NPROC_PER_NODE:-$world}" \
            --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" "${extract[@]}"
    fi
    run_video_recipe "$name-distill-$model" "$world" "$@" --distill --teacher-model "$model" --teacher-cache "$cache"
}
