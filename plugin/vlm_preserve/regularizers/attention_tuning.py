"""Attention-Tuning baseline (Dubey et al. 2024, as compared in RRVLM): of the language model only the
self-attention projections train; the projector trains too; everything else in the LLM is frozen.
Not a loss: it decides `requires_grad` once, after upstream has set its own."""
from __future__ import annotations

import re

_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|dense|Wqkv|out_proj)\.")


def is_attention_projection(name: str) -> bool:
    return bool(_ATTN.search(name))


def apply_attention_tuning(named_params, is_llm, is_projector) -> list[str]:
    """Set requires_grad on (name, param) pairs; returns the names left trainable."""
    trainable = []
    for name, p in named_params:
        if is_projector(name):
            p.requires_grad_(True)
        elif is_llm(name):
            p.requires_grad_(is_attention_projection(name))
        if p.requires_grad:
            trainable.append(name)
    return trainable
