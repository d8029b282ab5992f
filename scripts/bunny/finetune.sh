#!/usr/bin/env bash
# Bunny visual instruction tuning (stage 2) with one of our regularizers, using the values Bunny documents
# for Bunny-v1.0-3B (phi-2 + SigLIP-384, 8 GPUs): full finetune by default, LoRA with LORA=1.
#
#   bash scripts/bunny/finetune.sh [REGULARIZER] [extra bunny-train flags...]
#   bash scripts/bunny/finetune.sh rdd,pre --rdd_weight 0.5
#   LORA=1 MODEL_TYPE=qwen1.5-1.8b MODEL=Qwen/Qwen1.5-1.8B bash scripts/bunny/finetune.sh pre
#   DRY_RUN=1 bash scripts/bunny/finetune.sh rdd      # print the command, run nothing
#
# Environment: MODEL_TYPE [phi-2]  MODEL [microsoft/phi-2]  VISION [google/siglip-so400m-patch14-384]
#   DATA_PATH [./data/finetune/bunny_695k.json]  IMAGE_FOLDER [./data/finetune/images]
#   PROJECTOR [./checkpoints-pretrain/bunny-$MODEL_TYPE-pretrain/mm_projector.bin]
#   OUTPUT_DIR [./checkpoints-$MODEL_TYPE/bunny-<regularizer>]  BATCH [8] GRAD_ACCUM [2] LORA [0]
#   DS_CONFIG [scripts/llava/zero3.json]  BUNNY_TRAIN [bunny-train on PATH]  DRY_RUN [0]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REG="none"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then REG="$1"; shift; fi
MODEL_TYPE="${MODEL_TYPE:-phi-2}"
MODEL="${MODEL:-microsoft/phi-2}"
VISION="${VISION:-google/siglip-so400m-patch14-384}"
DATA_PATH="${DATA_PATH:-./data/finetune/bunny_695k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./data/finetune/images}"
PROJECTOR="${PROJECTOR:-./checkpoints-pretrain/bunny-$MODEL_TYPE-pretrain/mm_projector.bin}"
LORA="${LORA:-0}"
TAG="bunny-${REG//,/-}$([ "$LORA" = 1 ] && echo -lora || true)"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints-$MODEL_TYPE/$TAG}"
BIN="${BUNNY_TRAIN:-$(command -v bunny-train || echo bunny-train)}"

args=(--regularizer "$REG" --deepspeed "${DS_CONFIG:-$HERE/../llava/zero3.json}"
      --model_name_or_path "$MODEL" --model_type "$MODEL_TYPE" --version bunny
      --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --vision_tower "$VISION"
      --pretrain_mm_mlp_adapter "$PROJECTOR" --mm_projector_type mlp2x_gelu --image_aspect_ratio pad
      --group_by_modality_length False --bf16 True --output_dir "$OUTPUT_DIR" --num_train_epochs 1
      --per_device_train_batch_size "${BATCH:-8}" --per_device_eval_batch_size 4
      --gradient_accumulation_steps "${GRAD_ACCUM:-2}" --evaluation_strategy no --save_strategy steps
      --save_steps 500 --save_total_limit 1 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
      --logging_steps 1 --tf32 True --model_max_length 2048 --gradient_checkpointing True
      --dataloader_num_workers 4 --lazy_preprocess True --report_to "${REPORT_TO:-none}")
if [ "$LORA" = 1 ]; then
  args+=(--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 --learning_rate 2e-4)
else
  args+=(--learning_rate 2e-5)
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' deepspeed "$BIN" "${args[@]}" "$@"; echo
else
  exec deepspeed "$BIN" "${args[@]}" "$@"
fi
