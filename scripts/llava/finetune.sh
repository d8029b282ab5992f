#!/usr/bin/env bash
# LLaVA-1.5 stage 2: full finetune of the LLM + projector on the 665k instruction mix, with the
# hyperparameters upstream documents for LLaVA-1.5 (7B: Vicuna-7B v1.5, CLIP ViT-L/14-336, 2-layer
# MLP projector; 8 GPUs x 16 = global batch 128), plus one of our regularizers.
#
#   bash scripts/llava/finetune.sh [REGULARIZER] [extra llava-train flags...]
#   bash scripts/llava/finetune.sh                       # plain upstream run (--regularizer none)
#   bash scripts/llava/finetune.sh rdd,pre --rdd_weight 0.5 --pre_layer 16
#   DRY_RUN=1 bash scripts/llava/finetune.sh rdd        # print the command, run nothing
#
# REGULARIZER: none | rdd | pre | soft_label | attention_tuning, comma-combinable (rdd,pre).
# LORA=1 gives upstream's documented LoRA recipe instead (what finetune_lora.sh sets): LoRA r 128,
# alpha 256 at lr 2e-4, projector at 2e-5; attention_tuning is refused there (it is an alternative to LoRA).
# Extra flags are appended last, so they also override any flag below (argparse: last one wins).
# Run from the directory holding playground/ and checkpoints/ (relative defaults, as upstream).
#
# Environment (defaults in brackets):
#   MODEL         [lmsys/vicuna-7b-v1.5]
#   VISION        [openai/clip-vit-large-patch14-336]
#   DATA_PATH     [./playground/data/llava_v1_5_mix665k.json]
#   IMAGE_FOLDER  [./playground/data]
#   PROJECTOR     [./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin]   (stage-1 output, pretrain.sh)
#   OUTPUT_DIR    [./checkpoints/llava-v1.5-7b, + -<regularizer> unless none, e.g. ...-7b-rdd-pre]
#   BATCH [16] GRAD_ACCUM [1]   per-device batch / accumulation; keep BATCH*GRAD_ACCUM*GPUs = 128
#   ATTN_IMPL     [flash_attention_2]  (what upstream's train_mem.py uses; ATTN_IMPL= omits the flag)
#   REPORT_TO     [wandb]
#   DS_CONFIG     [scripts/llava/zero3.json]
#   NUM_GPUS, DS_LAUNCHER_ARGS   deepspeed launcher options (default: all visible GPUs)
#   LLAVA_TRAIN   path of the llava-train console script (default: the one on PATH)
#   DRY_RUN=1     print the final command instead of running it
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/llava/_common.sh
source "$HERE/_common.sh"

take_regularizer "$@"
shift "$REG_SHIFT"

MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION="${VISION:-openai/clip-vit-large-patch14-336}"
DATA_PATH="${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data}"
PROJECTOR="${PROJECTOR:-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}"
LORA="${LORA:-0}"
base="./checkpoints/llava-v1.5-7b$([ "$LORA" = 1 ] && echo -lora || true)"  # upstream's loader keys on "lora"
if [ "$REG_TAG" = "none" ]; then
  OUTPUT_DIR="${OUTPUT_DIR:-$base}"
else
  OUTPUT_DIR="${OUTPUT_DIR:-$base-$REG_TAG}"
fi
BATCH="${BATCH:-16}"
GRAD_ACCUM="${GRAD_ACCUM:-1}"
ATTN_IMPL="${ATTN_IMPL-flash_attention_2}"
REPORT_TO="${REPORT_TO:-wandb}"
DS_CONFIG="${DS_CONFIG:-$HERE/zero3.json}"

args=(
  --regularizer "$REG"
  --deepspeed "$DS_CONFIG"
  --model_name_or_path "$MODEL"
  --version v1
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION"
  --pretrain_mm_mlp_adapter "$PROJECTOR"
  --mm_projector_type mlp2x_gelu
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --image_aspect_ratio pad
  --group_by_modality_length True
  --bf16 True
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs 1
  --per_device_train_batch_size "$BATCH"
  --per_device_eval_batch_size 4
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --evaluation_strategy no
  --save_strategy steps
  --save_steps 50000
  --save_total_limit 1
  --learning_rate "$([ "$LORA" = 1 ] && echo 2e-4 || echo 2e-5)"
  --weight_decay 0.
  --warmup_ratio 0.03
  --lr_scheduler_type cosine
  --logging_steps 1
  --tf32 True
  --model_max_length 2048
  --gradient_checkpointing True
  --dataloader_num_workers 4
  --lazy_preprocess True
  --report_to "$REPORT_TO"
)
if [ -n "$ATTN_IMPL" ]; then
  args+=(--attn_implementation "$ATTN_IMPL")
fi

if [ "$LORA" = 1 ]; then
  args+=(--lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5)
fi
launch "${args[@]}" "$@"
