"""RDD — Representation Distribution Difference loss (the RRVLM paper on representation regulation).

Pulls the distribution of text token embeddings T towards the distribution of projected visual
embeddings V (both are the inputs of the first decoder layer), with the squared kernel MMD
(Gretton et al. 2012), biased V-statistic:

    MMD²(T, V) = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(v_j, v_j') − 2 mean_{i,j} k(t_i, v_j)

Kernels:
    rbf     k(x, y) = exp(−‖x − y‖² / (2σ²)),  σ² = bandwidth_scale · mean_{a≠b} ‖z_a − z_b‖² over the
            pooled sample z = T ∪ V ("mean heuristic", no gradient; closed form, O(n·d))
    linear  k(x, y) = x·y                      → MMD² = ‖mean T − mean V‖²
    poly    k(x, y) = (x·y / d + 1)³
    l2      the paper's "Euclidean" ablation:  ‖mean T − mean V‖₂  (not an MMD)

Total loss = LM loss + rdd_weight · RDD. Always fp32. Cost: the kernel means are computed in row blocks
of `rdd_block_size`, each block recomputed in backward (activation checkpointing), so memory holds one
block × n kernel entries, never a dense (n × n) matrix; and at most `rdd_max_tokens` tokens per
modality enter a step (a uniform sample without replacement, seeded per step). The capped estimate is
unbiased for the kernel means up to O(1/√cap) noise: tests/test_losses.py checks that on a 6000+6000-token
batch it stays within 5% (relative) of the exact MMD² at cap 2048, and within 10% at cap 1024.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ..capture import StepCapture
from ..config import ConfigError, choice
from .base import Method, ModelDims, register

KERNELS = ("rbf", "linear", "poly", "l2")


@dataclass
class RDDConfig:
    rdd_weight: float = field(default=1.0, metadata={"help": "Weight of the RDD term (paper does not report one)."})
    rdd_kernel: str = field(default="rbf", metadata={"help": f"Kernel: {', '.join(KERNELS)} (l2 = Euclidean ablation)."})
    rdd_bandwidth_scale: float = field(default=1.0, metadata={"help": "RBF bandwidth = this × mean-heuristic σ² (paper ablates 0.5, 2)."})
    rdd_max_tokens: int = field(default=4096, metadata={"help": "At most this many tokens per modality per step (uniform sample); 0 = no cap."})
    rdd_block_size: int = field(default=1024, metadata={"help": "Row block of the kernel computation (memory ∝ block × tokens)."})

    def validate(self) -> None:
        choice("--rdd_kernel", self.rdd_kernel, KERNELS)
        if self.rdd_weight < 0:
            raise ConfigError(f"--rdd_weight {self.rdd_weight} is negative; use a weight >= 0.")
        if self.rdd_bandwidth_scale <= 0:
            raise ConfigError(f"--rdd_bandwidth_scale {self.rdd_bandwidth_scale} must be > 0 (1.0 = mean heuristic).")
        if self.rdd_max_tokens < 0 or self.rdd_block_size <= 0:
            raise ConfigError("--rdd_max_tokens must be >= 0 (0 = no cap) and --rdd_block_size > 0.")


def mean_heuristic_sigma2(*parts: torch.Tensor) -> torch.Tensor:
    """Over the pooled sample z = parts[0] ∪ parts[1] ∪ ..., the mean over distinct pairs of ‖z_a − z_b‖²
    = 2n/(n−1) · (mean ‖z‖² − ‖mean z‖²): O(n·d), no n² matrix and no pooled copy."""
    with torch.no_grad():
        n = sum(p.shape[0] for p in parts)
        sq = sum(p.float().pow(2).sum() for p in parts) / n
        mean = sum(p.float().sum(0) for p in parts) / n
        return (2 * (sq - mean.pow(2).sum()) * n / max(n - 1, 1)).clamp_min(1e-12)


def _block_kernel_sum(a: torch.Tensor, b: torch.Tensor, kernel: str, inv_two_sigma2, d: int) -> torch.Tensor:
    # fp32 copies are made here, per block, so only the (capped) inputs in their own dtype are kept for backward
    a, b = a.float(), b.float()
    if kernel == "rbf":
        sq = (a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2 * a @ b.T).clamp_min(0)
        return torch.exp(-sq * inv_two_sigma2).sum()
    if kernel == "poly":
        return (a @ b.T / d + 1).pow(3).sum()
    raise ValueError(kernel)


def kernel_mean(a: torch.Tensor, b: torch.Tensor, kernel: str, inv_two_sigma2=None, block_size: int = 1024) -> torch.Tensor:
    """mean_{i,j} k(a_i, b_j), in row blocks recomputed in backward: memory O(block_size · len(b))."""
    d = a.shape[-1]
    if inv_two_sigma2 is None:
        inv_two_sigma2 = torch.zeros((), device=a.device)
    total = a.new_zeros((), dtype=torch.float32)
    for start in range(0, a.shape[0], block_size):
        blk = a[start:start + block_size]
        if torch.is_grad_enabled() and (blk.requires_grad or b.requires_grad):
            total = total + checkpoint(_block_kernel_sum, blk, b, kernel, inv_two_sigma2, d, use_reentrant=False)
        else:
            total = total + _block_kernel_sum(blk, b, kernel, inv_two_sigma2, d)
    return total / (a.shape[0] * b.shape[0])


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "rbf", bandwidth_scale: float = 1.0,
         block_size: int = 1024) -> torch.Tensor:
    """Squared MMD (biased V-statistic) between samples x (n, d) and y (m, d), computed in fp32."""
    if kernel == "linear":
        return (x.float().mean(0) - y.float().mean(0)).pow(2).sum()
    if kernel == "l2":
        return torch.linalg.vector_norm(x.float().mean(0) - y.float().mean(0))
    inv = None
    if kernel == "rbf":
        inv = 1.0 / (2 * bandwidth_scale * mean_heuristic_sigma2(x, y))
    kxx = kernel_mean(x, x, kernel, inv, block_size)
    kyy = kernel_mean(y, y, kernel, inv, block_size)
    kxy = kernel_mean(x, y, kernel, inv, block_size)
    return kxx + kyy - 2 * kxy


def subsample(x: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    if cap <= 0 or x.shape[0] <= cap:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:cap].to(x.device)
    return x[idx]


@register
class RDD(Method):
    name = "rdd"
    config_class = RDDConfig

    def __init__(self, cfg: RDDConfig, dims: ModelDims | None = None):  # RDD needs no dimension
        super().__init__(cfg, dims)
        self.weight = cfg.rdd_weight

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        """(value, valid). With no text or no visual token the same computation runs on a zero
        placeholder so every rank runs identical code (ZeRO-3), and the caller weights it by 0."""
        t, v = cap.text_embeds(), cap.visual_embeds()
        valid = t.shape[0] > 0 and v.shape[0] > 0
        if not valid:
            ref = t if t.shape[0] else v
            t = t if t.shape[0] else ref.new_zeros(1, ref.shape[-1])
            v = v if v.shape[0] else ref.new_zeros(1, ref.shape[-1])
        g = torch.Generator().manual_seed(cap.step_seed)
        t = subsample(t, self.cfg.rdd_max_tokens, g)
        v = subsample(v, self.cfg.rdd_max_tokens, g)
        return mmd2(t, v, self.cfg.rdd_kernel, self.cfg.rdd_bandwidth_scale, self.cfg.rdd_block_size), valid
