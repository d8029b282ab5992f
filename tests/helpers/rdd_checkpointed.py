"""RDD's MMD² as it was computed up to commit 81661ba (checkpointed row blocks, autograd through each block),
kept (code unchanged, docstrings dropped) as the "old path" that tests/test_losses.py and benchmarks/bench_overhead.py compare the custom
autograd function of regularizers/rdd.py against. Not used by the plugin."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def mean_heuristic_sigma2(*parts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        n = sum(p.shape[0] for p in parts)
        sq = sum(p.float().pow(2).sum() for p in parts) / n
        mean = sum(p.float().sum(0) for p in parts) / n
        return (2 * (sq - mean.pow(2).sum()) * n / max(n - 1, 1)).clamp_min(1e-12)


def _block_kernel_sum(a, b, kernel, inv_two_sigma2, d):
    a, b = a.float(), b.float()
    if kernel == "rbf":
        sq = (a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2 * a @ b.T).clamp_min(0)
        return torch.exp(-sq * inv_two_sigma2).sum()
    if kernel == "poly":
        return (a @ b.T / d + 1).pow(3).sum()
    raise ValueError(kernel)


def kernel_mean(a, b, kernel, inv_two_sigma2=None, block_size=1024):
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


def mmd2(x, y, kernel="rbf", bandwidth_scale=1.0, block_size=1024):
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


def subsample(x, cap, generator):
    if cap <= 0 or x.shape[0] <= cap:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:cap].to(x.device)
    return x[idx]


def rdd_loss(cap, rdd_cfg):
    """RDD.loss of commit 81661ba: gather text and visual rows, cap each, MMD²."""
    t, v = cap.text_embeds(), cap.visual_embeds()
    valid = t.shape[0] > 0 and v.shape[0] > 0
    if not valid:
        ref = t if t.shape[0] else v
        t = t if t.shape[0] else ref.new_zeros(1, ref.shape[-1])
        v = v if v.shape[0] else ref.new_zeros(1, ref.shape[-1])
    g = torch.Generator().manual_seed(cap.step_seed)
    t = subsample(t, rdd_cfg.rdd_max_tokens, g)
    v = subsample(v, rdd_cfg.rdd_max_tokens, g)
    return mmd2(t, v, rdd_cfg.rdd_kernel, rdd_cfg.rdd_bandwidth_scale, rdd_cfg.rdd_block_size), valid
