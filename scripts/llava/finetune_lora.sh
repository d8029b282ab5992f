#!/usr/bin/env bash
# LLaVA-1.5 stage 2, LoRA variant: LoRA (r 128, alpha 256) on the LLM at lr 2e-4, projector fully trained at
# lr 2e-5 (upstream's documented LLaVA-1.5 LoRA recipe, 7B, 8 GPUs x 16 = batch 128), plus one of our
# regularizers. Same arguments and environment as finetune.sh, which this runs with LORA=1.
#
#   bash scripts/llava/finetune_lora.sh [REGULARIZER] [extra llava-train flags...]
#   bash scripts/llava/finetune_lora.sh rdd --rdd_kernel linear
#   DRY_RUN=1 bash scripts/llava/finetune_lora.sh pre
#
# attention_tuning is refused by llava-train here (it is an alternative to LoRA: use finetune.sh).
# The saved checkpoint holds only LoRA weights + projector; load it with --model-base "$MODEL".
set -euo pipefail
LORA=1 exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/finetune.sh" "$@"
