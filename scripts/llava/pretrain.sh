#!/usr/bin/env bash
# LLaVA-1.5 stage 1: projector pretraining (--tune_mm_mlp_adapter True: only the 2-layer MLP projector
# trains; LLM and vision tower frozen) on the 558k LCS caption set with the "plain" template, with
# upstream's documented LLaVA-1.5 values (lr 1e-3, 8 GPUs x 32 = batch 256, ZeRO-2).
# Writes <OUTPUT_DIR>/mm_projector.bin, the PROJECTOR that finetune.sh / finetune_lora.sh start from.
#
#   bash scripts/llava/pretrain.sh [REGULARIZER] [extra llava-train flags...]
#   bash scripts/llava/pretrain.sh rdd --rdd_weight 0.5
#   DRY_RUN=1 bash scripts/llava/pretrain.sh
#
# The regularizers run in this stage too: their terms are added to the loss in the same way, and the
# gradient reaches the projector (the only trained weights besides PRe's own predictor head, which is
# never written into mm_projector.bin). rdd, pre, soft_label and their combinations work;
# attention_tuning is refused with --tune_mm_mlp_adapter (it picks the trainable LLM weights itself).
# Extra flags are appended last, so they also override any flag below (argparse: last one wins).
# Run from the directory holding playground/ and checkpoints/ (relative defaults, as upstream).
#
# Environment (defaults in brackets):
#   MODEL         [lmsys/vicuna-7b-v1.5]
#   VISION        [openai/clip-vit-large-patch14-336]
#   DATA_PATH     [./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json]
#   IMAGE_FOLDER  [./playground/data/LLaVA-Pretrain/images]
#   OUTPUT_DIR    [./checkpoints/llava-v1.5-7b-pretrain, + -<regularizer> unless none]
#                 (finetune.sh's default PROJECTOR is the unregularized one; set PROJECTOR there to
#                  start stage 2 from a regularized projector)
#   BATCH [32] GRAD_ACCUM [1]   per-device batch / accumulation; keep BATCH*GRAD_ACCUM*GPUs = 256
#   ATTN_IMPL     [flash_attention_2]  (ATTN_IMPL= omits the flag)
#   REPORT_TO     [wandb]
#   DS_CONFIG     [scripts/llava/zero2.json]
#   NUM_GPUS, DS_LAUNCHER_ARGS, LLAVA_TRAIN, DRY_RUN=1   as in finetune.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/llava/_common.sh
source "$HERE/_common.sh"

take_regularizer "$@"
shift "$REG_SHIFT"

MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION="${VISION:-openai/clip-vit-large-patch14-336}"
DATA_PATH="${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}"
if [ "$REG_TAG" = "none" ]; then
  OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-pretrain}"
else
  OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-pretrain-$REG_TAG}"
fi
BATCH="${BATCH:-32}"
GRAD_ACCUM="${GRAD_ACCUM:-1}"
ATTN_IMPL="${ATTN_IMPL-flash_attention_2}"
REPORT_TO="${REPORT_TO:-wandb}"
DS_CONFIG="${DS_CONFIG:-$HERE/zero2.json}"

args=(
  --regularizer "$REG"
  --deepspeed "$DS_CONFIG"
  --model_name_or_path "$MODEL"
  --version plain
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION"
  --mm_projector_type mlp2x_gelu
  --tune_mm_mlp_adapter True
  --mm_vision_select_layer -2
  --mm_use_im_start_end False
  --mm_use_im_patch_token False
  --bf16 True
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs 1
  --per_device_train_batch_size "$BATCH"
  --per_device_eval_batch_size 4
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --evaluation_strategy no
  --save_strategy steps
  --save_steps 24000
  --save_total_limit 1
  --learning_rate 1e-3
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

launch "${args[@]}" "$@"
