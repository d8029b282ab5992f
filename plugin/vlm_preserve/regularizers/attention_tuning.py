"""Attention-Tuning baseline (Dubey et al. 2024, as compared in RRVLM): of the language model only the
self-attention projections train; the projector trains too; everything else in the LLM is frozen.
Not a loss: it decides `requires_grad` once, when attached (after upstream has set its own), and detach
restores every flag."""
from __future__ import annotations

import re

from .base import Method, SetupContext, register

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


@register
class AttentionTuning(Method):
    name = "attention_tuning"
    has_loss = False

    def setup(self, ctx: SetupContext) -> None:
        previous = apply_attention_tuning(ctx.adapter.llm_modules(ctx.model), ctx.adapter.projector_modules(ctx.model))
        ctx.patches.call_on_undo(lambda: [p.requires_grad_(v) for p, v in previous.items()])
