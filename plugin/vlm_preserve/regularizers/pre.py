"""PRe — Predictive Regularization (the PRe paper).

A throw-away predictor head makes the visual tokens of a middle decoder layer predict the initial
visual features:

    p = f_pred(H_v^l)            visual tokens output by decoder layer l (with gradient)
    z = stop_gradient(H_v^0)     anchor: `pre_llm` = projector output (the visual tokens entering the LLM),
                                 or `pre_proj` = the vision tower's selected features (before the projector)
    L_PRe = − mean_i cos(p_i, z_i)
    L = L_LM + pre_weight · L_PRe          (paper: pre_weight 0.5; 0.2 too weak, 2.0 hurts)

f_pred: Linear(d, d) → GELU → Linear(d, d_anchor) (the paper does not report width or activation).
It exists only in training: saved in Trainer checkpoints, never in an exported model.
Memory: the head and the cosine run over chunks of `PRE_CHUNK` tokens in one autograd function that saves no
activation and recomputes each chunk in backward, adding its gradients in place into one buffer per input; so beyond
the inputs and their gradients the term holds one chunk's activations and gradients (and, transiently, one weight
matrix's gradient for that chunk under autocast; without autocast the head's backward is written out and adds each
weight's gradient straight into its buffer), whatever the number of visual tokens. Same value as the plain formula, gradients
to rounding (tests/test_losses.py). Under DeepSpeed ZeRO-3 the same function runs on the head's weights gathered once for
the forward and once for the backward (see head_pre_loss).
Layer l is 0-based; `middle` = num_layers // 2 (Vicuna-7B: 16 of 32).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from ..capture import StepCapture
from ..compat import autocast_state
from ..config import ConfigError, choice
from .base import Method, ModelDims, register

ANCHORS = ("pre_llm", "pre_proj")


@dataclass
class PReConfig:
    pre_weight: float = field(default=0.5, metadata={"help": "Weight λ of the PRe term (paper default 0.5)."})
    pre_layer: str = field(default="middle", metadata={"help": "Decoder layer (0-based) whose visual tokens predict the anchor, or 'middle'."})
    pre_anchor: str = field(default="pre_llm", metadata={"help": "Anchor: pre_llm (projector output) or pre_proj (vision-tower features)."})

    def validate(self) -> None:
        choice("--pre_anchor", self.pre_anchor, ANCHORS)
        if self.pre_weight < 0:
            raise ConfigError(f"--pre_weight {self.pre_weight} is negative; use a weight >= 0 (paper: 0.5).")
        if self.pre_layer != "middle":
            try:
                int(self.pre_layer)
            except ValueError:
                raise ConfigError(f"--pre_layer {self.pre_layer!r} is not an integer layer index or 'middle'.") from None

    def layer_index(self, num_layers: int) -> int:
        if self.pre_layer == "middle":
            return num_layers // 2
        k = int(self.pre_layer)
        if not 0 <= k < num_layers:
            raise ConfigError(f"--pre_layer {k} is out of range for a {num_layers}-layer LLM "
                              f"(use 0..{num_layers - 1} or 'middle').")
        return k


class PReHead(nn.Sequential):
    def __init__(self, d_in: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


# rows per chunk in a 2-byte dtype; a 4-byte one takes half as many, so that a chunk's working set is the same bytes
# (own memory at the 7B shape, bf16: 1024 rows 0.90%, 512 0.61%; docs/benchmarks.md)
PRE_CHUNK = 512


def pre_loss(pred: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """−mean per-token cosine, fp32; the anchor carries no gradient."""
    return -F.cosine_similarity(pred.float(), anchor.detach().float(), dim=-1, eps=1e-6).mean()


def _cos_sum(head, h: torch.Tensor, anchor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    pred = head(h.to(dtype))
    return F.cosine_similarity(pred.float(), anchor.float(), dim=-1, eps=1e-6).sum()


def _head_weights(w: dict, x: torch.Tensor) -> torch.Tensor:
    """PReHead's forward from its weights by name (the same ops as its modules), without calling the modules."""
    return F.linear(F.gelu(F.linear(x, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"])


class _ChunkedHeadCosine(torch.autograd.Function):
    """Σ_i cos(head(h_i), anchor_i) over all rows of h, chunk by chunk. Forward: no graph, nothing saved but h, the
    anchor and the head's parameters. Backward: each chunk recomputed (under the forward's autocast state) and
    back-propagated on its own, its gradients added in place into one buffer per input (h, each parameter), all
    allocated first and returned once. So no chunk makes a full-size gradient of h (slicing h under autograd did:
    one (rows × d) buffer per chunk), and each parameter's gradient reaches its AccumulateGrad once (as DDP needs).
    `zero3`: the head's weights are DeepSpeed ZeRO-3 partitions, gathered by the caller around the forward and here
    for the backward (until their gradients are accumulated), and the head runs from its weights (`_head_weights`),
    never through its modules."""

    @staticmethod
    def forward(ctx, h, anchor, head, chunk, names, dtype, zero3, *params):
        run = (lambda t: _head_weights(dict(zip(names, params)), t)) if zero3 else head
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            total = total + _cos_sum(run, h[i:i + chunk], anchor[i:i + chunk], dtype)
        ctx.save_for_backward(h, anchor)
        ctx.params = params  # not saved tensors: under ZeRO-3 their data is swapped for partitions after the forward
        ctx.head, ctx.chunk, ctx.names, ctx.dtype, ctx.zero3 = head, chunk, names, dtype, zero3
        ctx.autocast = autocast_state(h.device.type)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        if not ctx.zero3:
            return _ChunkedHeadCosine._backward(ctx, g)
        gather = _gathered(ctx.params)
        gather.__enter__()
        try:
            grads = _ChunkedHeadCosine._backward(ctx, g)
        except BaseException:
            gather.__exit__(None, None, None)
            raise
        _release_after_accumulation(gather, [p for p, gr in zip(ctx.params, grads[7:]) if gr is not None])
        return grads

    @staticmethod
    def _backward(ctx, g):
        (h, anchor), params = ctx.saved_tensors, ctx.params
        need_h, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[7:]
        gh = torch.zeros_like(h) if need_h else None
        # the parameters as fresh leaves sharing their storage, each with its gradient buffer preset: autograd then
        # adds every chunk's gradient into it in place
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need_p)]
        for leaf in leaves:
            if leaf.requires_grad:
                leaf.grad = torch.zeros_like(leaf)
        weights = dict(zip(ctx.names, leaves))
        enabled, dtype = ctx.autocast
        if not enabled and isinstance(ctx.head, PReHead):
            grads = {n: leaf.grad for n, leaf in zip(ctx.names, leaves) if leaf.requires_grad}
            for i in reversed(range(0, h.shape[0], ctx.chunk)):
                _chunk_backward(weights, h[i:i + ctx.chunk], anchor[i:i + ctx.chunk], g, ctx.dtype,
                                gh[i:i + ctx.chunk] if need_h else None, grads)
            return (gh, None, None, None, None, None, None,
                    *(leaf.grad if leaf.requires_grad else None for leaf in leaves))
        run = (lambda t: _head_weights(weights, t)) if ctx.zero3 else (
            lambda t: functional_call(ctx.head, weights, (t,)))
        for i in reversed(range(0, h.shape[0], ctx.chunk)):  # last chunk first, the old path's order
            x = h[i:i + ctx.chunk].detach().requires_grad_(need_h)
            if need_h:
                x.grad = gh[i:i + ctx.chunk]
            with torch.enable_grad(), torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
                s = _cos_sum(run, x, anchor[i:i + ctx.chunk], ctx.dtype)
            inputs = [t for t in (x, *leaves) if t.requires_grad]
            if inputs:
                torch.autograd.backward(s, g, inputs=inputs)
        return (gh, None, None, None, None, None, None,
                *(leaf.grad if leaf.requires_grad else None for leaf in leaves))


def _chunk_backward(w: dict, x, anchor, g, dtype, gx, grads: dict) -> None:
    """One chunk's backward through PReHead by hand (no autocast): each weight's gradient is added straight into its
    buffer (addmm_), where autograd would first make the chunk's own (d × d) gradient and then add it, the largest
    transient of the term (64 MiB per fp32 4096² weight). The cosine's backward stays autograd's, on (chunk × d)."""
    xc = x.detach().to(dtype)
    a = F.linear(xc, w["0.weight"], w["0.bias"])
    u = F.gelu(a)
    p = F.linear(u, w["2.weight"], w["2.bias"]).requires_grad_()
    with torch.enable_grad():
        s = F.cosine_similarity(p.float(), anchor.float(), dim=-1, eps=1e-6).sum()
        (gp,) = torch.autograd.grad(s, p, g)
    del s, p  # each (chunk × d) tensor freed once its last use is done: the chunk's peak is a few of them
    if "2.weight" in grads:
        grads["2.weight"].addmm_(gp.t(), u)
    if "2.bias" in grads:
        grads["2.bias"].add_(gp.sum(0))
    del u
    if not (gx is not None or "0.weight" in grads or "0.bias" in grads):
        return
    gu = gp @ w["2.weight"]
    del gp
    ga = torch.ops.aten.gelu_backward(gu, a)
    del gu, a
    if "0.weight" in grads:
        grads["0.weight"].addmm_(ga.t(), xc)
    if "0.bias" in grads:
        grads["0.bias"].add_(ga.sum(0))
    if gx is not None:
        gx.add_((ga @ w["0.weight"]).to(gx.dtype))


def _gathered(params):
    import deepspeed
    return deepspeed.zero.GatheredParameters(params)


def _release_after_accumulation(gather, params) -> None:
    """Leave `gather` once autograd has put each of `params`' gradients in place, which it does after the backward
    that returned them: a parameter partitioned again by then cannot take its full-size gradient. ZeRO-3's own hook
    on each parameter (reduce the gradient) was registered first, so it runs first, on the gathered parameter, as it
    does for the model's modules."""
    left = {id(p) for p in params}
    handles = []

    def accumulated(p):
        left.discard(id(p))
        if not left:
            for h in handles:
                h.remove()
            gather.__exit__(None, None, None)

    if not left:
        return gather.__exit__(None, None, None)
    handles.extend(p.register_post_accumulate_grad_hook(accumulated) for p in params)


def head_pre_loss(head: nn.Module, h: torch.Tensor, anchor: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """pre_loss(head(h), anchor): the head and the cosine over chunks of rows, recomputed in backward (same value,
    and gradients to fp32 rounding)."""
    anchor = anchor.detach()
    names, params = zip(*head.named_parameters())
    dtype = head[0].weight.dtype  # h enters the head in its dtype, as the Attachment casts the head to the model's
    chunk = chunk or max(1, PRE_CHUNK * 2 // head[0].weight.element_size())
    args = (h, anchor, head, chunk, names, dtype)
    if any(hasattr(p, "ds_id") for p in params):
        # DeepSpeed ZeRO-3: the head is gathered once around the forward and once in the backward, the same two
        # collectives on every rank whatever its visual-token count (a text-only rank runs one placeholder row), and
        # its modules are never called: their hooks would gather per call and release what was gathered here. The
        # gather comes before apply so that autograd records the parameters' full shapes for their gradients.
        with _gathered(params):
            total = _ChunkedHeadCosine.apply(*args, True, *params)
    else:
        total = _ChunkedHeadCosine.apply(*args, False, *params)
    return -total / h.shape[0]


@register
class PRe(Method):
    name = "pre"
    config_class = PReConfig

    def __init__(self, cfg: PReConfig, dims: ModelDims):
        super().__init__(cfg, dims)
        self.weight = cfg.pre_weight
        self.layer = cfg.layer_index(dims.num_layers)
        self.hidden_layers = (self.layer,)
        d_out = dims.hidden_size if cfg.pre_anchor == "pre_llm" else dims.vision_hidden_size
        self.head = self.heads = PReHead(dims.hidden_size, d_out)
        self.needs_visual_features = cfg.pre_anchor == "pre_proj"

    def loss(self, cap: StepCapture) -> tuple[torch.Tensor, bool]:
        # hidden_states[0] is the embedding output, so layer k's output is hidden_states[k + 1].
        h = cap.hidden_states[self.layer + 1][cap.image_mask]
        anchor = cap.visual_embeds() if self.cfg.pre_anchor == "pre_llm" else cap.visual_features
        if not h.shape[0]:  # still run the head (ZeRO-3 gathers its weights on every rank), weighted by 0
            return self.placeholder(cap), False
        return head_pre_loss(self.head, h, anchor), True

    def placeholder(self, cap: StepCapture) -> torch.Tensor:
        h = cap.hidden_states[self.layer + 1].new_zeros(1, self.head[0].in_features)
        return head_pre_loss(self.head, h, h.new_ones(1, self.head[-1].out_features))
