#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct full tuning with ms-swift 4.5.3 and vlm-preserve's RDD + PRe, 4 GPUs, DeepSpeed ZeRO-3.
# Hyperparameters: ms-swift's own full-tuning example for this model (examples/train/multimodal/rlhf/dpo/full.sh
# in its repository: lr 1e-5, batch 1 per device, 16 per step, ZeRO-3, vision tower frozen, bf16), here for SFT;
# the aligner (merger) is left trainable (--freeze_aligner false) so that RDD's gradient reaches it. Replace the
# dataset with yours. The same run through ms-swift's plugin mechanism instead of this launcher:
#   VLM_PRESERVE="--regularizer rdd,pre --rdd_weight 0.5" swift sft <the flags below> \
#       --external_plugins "$(vlm-preserve swift-plugin)"
# The terms are logged as rdd_loss / pre_loss in <output_dir>/v*/logging.jsonl.
set -euo pipefail
nproc_per_node=4
NPROC_PER_NODE=$nproc_per_node \
MAX_PIXELS=1003520 \
swift-sft \
    --model Qwen/Qwen2.5-VL-7B-Instruct \
    --dataset 'AI-ModelScope/LaTeX_OCR:human_handwrite#20000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --learning_rate 1e-5 \
    --freeze_vit true \
    --freeze_aligner false \
    --gradient_accumulation_steps $((16 / nproc_per_node)) \
    --save_steps 100 \
    --save_total_limit 2 \
    --deepspeed zero3 \
    --logging_steps 5 \
    --max_length 4096 \
    --output_dir output \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --dataset_num_proc 4 \
    --save_only_model true \
    --regularizer rdd,pre \
    --rdd_weight 0.5
