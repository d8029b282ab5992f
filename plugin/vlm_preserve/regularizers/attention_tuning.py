"""Attention-Tuning baseline (Dubey et al. 2024, as compared in RRVLM): of the language model only the
self-attention projections train; the projector trains too; everything else in the LLM is frozen.
Not a loss: it decides `requires_grad` once, after upstream has set its own."""
from __future__ import annotations

import re

_ATTN = re.compile(r"(^|\.)(self_attn|attention|attn)\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|dense|Wqkv|out_proj)\.")


def is_attention_projection(name: str) -> bool:
    return bool(_ATTN.search(name))


def apply_attention_tuning(llm_modules, projector_modules) -> dict:
    """Set requires_grad; returns {param: previous requires_grad} so the change can be undone."""
    previous = {}
    for module in llm_modules:
        for name, p in module.named_parameters():
            previous.setdefault(p, p.requires_grad)
            p.requires_grad_(is_attention_projection("." + name))
    for module in projector_modules:
        for p in module.parameters():
            previous.setdefault(p, p.requires_grad)
            p.requires_grad_(True)
    return previous
