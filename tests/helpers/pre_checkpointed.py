"""PRe's head + cosine as computed up to commit 234fc78 (checkpointed token chunks, autograd through each chunk's
slice of h), kept (code unchanged, docstrings dropped) as the "old path" that tests/test_losses.py and
benchmarks/bench_overhead.py compare the recomputing autograd function of regularizers/pre.py against. Not used by
the plugin."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PRE_CHUNK = 1024


def _cos_sum(head: nn.Module, h: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    pred = head(h.to(head[0].weight.dtype))
    return F.cosine_similarity(pred.float(), anchor.float(), dim=-1, eps=1e-6).sum()


def head_pre_loss(head: nn.Module, h: torch.Tensor, anchor: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    chunk = chunk or PRE_CHUNK
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        chunk = max(h.shape[0], 1)
    anchor = anchor.detach()
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        args = (head, h[i:i + chunk], anchor[i:i + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(_cos_sum, *args, use_reentrant=False)
        else:
            total = total + _cos_sum(*args)
    return -total / h.shape[0]
