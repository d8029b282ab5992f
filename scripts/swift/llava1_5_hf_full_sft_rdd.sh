#!/usr/bin/env bash
# LLaVA-1.5-7B (the transformers-format llava-hf/llava-1.5-7b-hf) full tuning with ms-swift 4.5.3 and
# vlm-preserve's LinguDistill (distill) + RDD. LLaVA-1.5's own stage-2 settings (lr 2e-5, batch 128, cosine, warmup
# 3%, 1 epoch, ZeRO-3, vision tower frozen, projector trained). distill's teacher is the LLM LLaVA-1.5 was built from
# (Vicuna-7B v1.5); ms-swift's logits_to_keep is turned off for it (it reads every response position's logits).
set -euo pipefail
nproc_per_node=8
NPROC_PER_NODE=$nproc_per_node \
swift-sft \
    --model llava-hf/llava-1.5-7b-hf \
    --model_type llava1_5_hf \
    --dataset 'AI-ModelScope/LaTeX_OCR:human_handwrite#20000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps $((128 / 4 / nproc_per_node)) \
    --learning_rate 2e-5 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.03 \
    --freeze_vit true \
    --freeze_aligner false \
    --deepspeed zero3 \
    --gradient_checkpointing true \
    --max_length 2048 \
    --logging_steps 5 \
    --save_steps 500 \
    --save_total_limit 2 \
    --output_dir output \
    --dataloader_num_workers 4 \
    --regularizer distill,rdd \
    --distill_teacher lmsys/vicuna-7b-v1.5
