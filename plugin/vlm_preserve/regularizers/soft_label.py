"""SoftLabel baseline (Harun & Kanan; applied to LLaVA by Srivastava et al., arXiv 2410.19925):
train on smoothed next-token targets instead of one-hot ones. Replaces the LM loss.

    uniform:  q = (1 − α)·onehot(y) + α/(V − 1)·(1 − onehot(y))
    dynamic:  q = α·stopgrad(softmax(z)) + (1 − α)·onehot(y)
    loss = mean over supervised tokens of −Σ_k q_k log softmax(z)_k      (next-token shift as in the LM loss)

Note the dynamic variant's gradient is (1 − α) times the hard-label gradient (the stop-gradient part
contributes softmax(z) − softmax(z) = 0); its value is (1 − α)·CE + α·H(softmax(z)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..capture import StepCapture
from ..config import ConfigError, choice
from .base import Method, ModelDims, register

VARIANTS = ("uniform", "dynamic")


@dataclass
class SoftLabelConfig:
    soft_label_variant: str = field(default="uniform", metadata={"help": "uniform or dynamic smoothed targets."})
    soft_label_alpha: float = field(default=0.1, metadata={"help": "Smoothing mass α in [0, 1) (not reported by the paper)."})

    def validate(self) -> None:
        choice("--soft_label_variant", self.soft_label_variant, VARIANTS)
        if not 0 <= self.soft_label_alpha < 1:
            raise ConfigError(f"--soft_label_alpha {self.soft_label_alpha} must be in [0, 1).")


def soft_label_loss(logits: torch.Tensor, labels: torch.Tensor, variant: str, alpha: float,
                    ignore_index: int = -100) -> torch.Tensor:
    logits = logits[..., :-1, :]
    labels = labels[..., 1:].to(logits.device)
    keep = labels != ignore_index
    if not keep.any():
        return logits.sum() * 0.0
    z = logits[keep].float()
    y = labels[keep]
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(-1, y[:, None]).squeeze(-1)
    if variant == "uniform":
        other = -(logp.sum(-1) + nll) / (z.shape[-1] - 1)
        return ((1 - alpha) * nll + alpha * other).mean()
    q = logp.detach().exp()
    return ((1 - alpha) * nll - alpha * (q * logp).sum(-1)).mean()


@register
class SoftLabel(Method):
    name = "soft_label"
    config_class = SoftLabelConfig
    replaces_lm_loss = True

    def __init__(self, cfg: SoftLabelConfig, dims: ModelDims | None = None):  # no dimension needed
        super().__init__(cfg, dims)

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        if cap.labels is None or cap.logits is None:
            raise RuntimeError("vlm-preserve: soft_label needs the batch's labels and the full logits; this loss path "
                               "has none (a compute_loss_func pops the labels; TRL's fused LM head builds no logits). "
                               "Use soft_label with a plain loss path, or the trainer's own label smoothing.")
        return soft_label_loss(cap.logits, cap.labels, self.cfg.soft_label_variant, self.cfg.soft_label_alpha), True
