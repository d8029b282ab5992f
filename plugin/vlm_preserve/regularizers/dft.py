"""DFT — Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
Reward Rectification", arXiv 2508.05629; LLaMA-Factory's `use_dft_loss`): each supervised token's cross-entropy
scaled by that token's own probability, with no gradient through the scale. Replaces the LM loss.

    loss = mean over supervised tokens of  sg(p(y_t)) · (−log p(y_t))      (next-token shift as in the LM loss)

A token the model already finds unlikely (p small) hardly moves the weights: tuning on data far from the LLM's own
distribution (short VQA answers) pulls less on it than plain cross-entropy does. No options.
"""
from __future__ import annotations

import torch

from ..capture import StepCapture
from .base import Method, ModelDims, register


def dft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logits = logits[..., :-1, :]
    labels = labels[..., 1:].to(logits.device)
    keep = labels != ignore_index
    if not keep.any():
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits[keep].float(), dim=-1).gather(-1, labels[keep][:, None]).squeeze(-1)
    return -(logp.detach().exp() * logp).mean()


@register
class DFT(Method):
    name = "dft"
    config_class = None
    replaces_lm_loss = True

    def __init__(self, cfg, dims: ModelDims | None = None):  # no options, no dimension
        super().__init__(cfg, dims)

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        if cap.labels is None or cap.logits is None:
            raise RuntimeError("vlm-preserve: dft needs the batch's labels and the full logits; this loss path has "
                               "none (a compute_loss_func pops the labels; TRL's fused LM head builds no logits). "
                               "Use dft with a plain loss path.")
        return dft_loss(cap.logits, cap.labels), True
