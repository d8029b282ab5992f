#!/usr/bin/env bash
# NVILA SFT with one of our regularizers, with the values of NVILA-Lite's own sft.sh (Qwen2 LLM, SigLIP-448,
# mlp_downsample_3x3_fix, packed batches, ZeRO-3): the stage-1.5 model in NVILA's llm/ vision_tower/ mm_projector/ layout.
#
#   bash scripts/nvila/finetune.sh [REGULARIZER] [extra nvila-train flags...]
#   bash scripts/nvila/finetune.sh rdd,pre --rdd_weight 0.5
#   DRY_RUN=1 bash scripts/nvila/finetune.sh rdd      # print the command, run nothing
#
# Environment: MODEL [runs/train/nvila-8b-pretrain/model]  DATA_MIXTURE [nvila-pretrain]
#   VISION [Efficient-Large-Model/paligemma-siglip-so400m-patch14-448]  PROJECTOR [mlp_downsample_3x3_fix]
#   OUTPUT_DIR [runs/train/nvila-<regularizer>/model]  GPUS [8]  BATCH [4]  GRAD_ACCUM [2]
#   DS_CONFIG [$VLM_PRESERVE_NVILA_SRC/scripts/zero3.json: NVILA's own ZeRO-3 config in the VILA checkout]  NVILA_TRAIN [nvila-train on PATH]  DRY_RUN [0]
set -euo pipefail
REG="none"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then REG="$1"; shift; fi
OUTPUT_DIR="${OUTPUT_DIR:-runs/train/nvila-${REG//,/-}/model}"
BIN="${NVILA_TRAIN:-$(command -v nvila-train || echo nvila-train)}"

DS="${DS_CONFIG:-${VLM_PRESERVE_NVILA_SRC:+$VLM_PRESERVE_NVILA_SRC/scripts/zero3.json}}"
if [ ! -f "$DS" ]; then
  echo "finetune.sh: no DeepSpeed config at '${DS}': set DS_CONFIG to NVILA's scripts/zero3.json in your VILA" \
       "checkout (or VLM_PRESERVE_NVILA_SRC to the checkout)" >&2; exit 2
fi
args=(--regularizer "$REG" --deepspeed "$DS"
      --model_name_or_path "${MODEL:-runs/train/nvila-8b-pretrain/model}" --data_mixture "${DATA_MIXTURE:-nvila-pretrain}"
      --vision_tower "${VISION:-Efficient-Large-Model/paligemma-siglip-so400m-patch14-448}"
      --mm_vision_select_feature cls_patch --mm_projector "${PROJECTOR:-mlp_downsample_3x3_fix}"
      --tune_vision_tower True --tune_mm_projector True --tune_language_model True --mm_vision_select_layer -2
      --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio dynamic --bf16 True
      --output_dir "$OUTPUT_DIR" --num_train_epochs 1 --per_device_train_batch_size "${BATCH:-4}"
      --gradient_accumulation_steps "${GRAD_ACCUM:-2}" --evaluation_strategy no --save_strategy steps
      --save_steps 100 --save_total_limit 1 --learning_rate 2e-5 --weight_decay 0. --warmup_ratio 0.03
      --lr_scheduler_type cosine --logging_steps 1 --model_max_length 4096 --gradient_checkpointing True
      --dataloader_num_workers 16 --vflan_no_system_prompt True --report_to "${REPORT_TO:-none}")
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' torchrun --nproc_per_node "${GPUS:-8}" "$BIN" "${args[@]}" "$@"; echo
else
  exec torchrun --nproc_per_node "${GPUS:-8}" "$BIN" "${args[@]}" "$@"
fi
