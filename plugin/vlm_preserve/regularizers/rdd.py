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

Total loss = LM loss + rdd_weight · RDD. Always fp32, whatever the input dtype, and under an enclosing autocast
too (it is switched off inside; the checkpointed blocks this replaced followed it, so their matmuls ran in bf16
there).

Bandwidth: σ² is computed under no_grad and is a constant of the backward: no gradient flows through the
bandwidth (unchanged from the checkpointed version).

Cost: rbf and poly run as one autograd function (`_BlockedMMD2`) over (block × block) tiles of the pooled
sample, each tile's rows gathered and cast to fp32 when it is used; the backward recomputes every tile instead of
saving any, and finishes each row block's gradient (fp32 accumulation, one cast to the input dtype) before the
next. So the memory beyond the inputs and their gradients is a few (block × d) fp32 buffers and one
(block × block) tile, whatever the number of tokens; the step's inputs are read in place (RDD.loss passes the
row indices of the text and image positions, never a gathered copy). At most `rdd_max_tokens` tokens per modality
enter a step (a uniform sample without replacement, seeded per step). The capped estimate is unbiased for the
kernel means up to O(1/√cap) noise: tests/test_losses.py checks that on a 6000+6000-token batch it stays within
5% (relative) of the exact MMD² at cap 2048, and within 10% at cap 1024.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

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
    rdd_block_size: int = field(default=1024, metadata={"help": "Tile side of the kernel computation (memory ∝ block × (width + block))."})

    def validate(self) -> None:
        choice("--rdd_kernel", self.rdd_kernel, KERNELS)
        if self.rdd_weight < 0:
            raise ConfigError(f"--rdd_weight {self.rdd_weight} is negative; use a weight >= 0.")
        if self.rdd_bandwidth_scale <= 0:
            raise ConfigError(f"--rdd_bandwidth_scale {self.rdd_bandwidth_scale} must be > 0 (1.0 = mean heuristic).")
        if self.rdd_max_tokens < 0 or self.rdd_block_size <= 0:
            raise ConfigError("--rdd_max_tokens must be >= 0 (0 = no cap) and --rdd_block_size > 0.")


def _blocks(x: torch.Tensor, rows: torch.Tensor | None, block: int, start: int = 0):
    """(offset, fp32 block) over the rows `rows` of x (all rows where None), from `start`: gathered and cast one
    block at a time, so no gathered or fp32 copy of a whole input exists at once."""
    n = x.shape[0] if rows is None else rows.shape[0]
    for s in range(start, n, block):  # one expression: the gathered block is freed as soon as it is cast
        yield s, (x[s:s + block] if rows is None else x.index_select(0, rows[s:s + block])).float()


def mean_heuristic_sigma2(*parts: torch.Tensor, rows=None, block_size: int = 1024) -> torch.Tensor:
    """Over the pooled sample z = parts[0] ∪ parts[1] ∪ ... (of each part its `rows`, all where None), the mean over
    distinct pairs of ‖z_a − z_b‖² = 2n/(n−1) · (mean ‖z‖² − ‖mean z‖²): O(n·d), no n² matrix, no pooled copy."""
    rows = rows or (None,) * len(parts)
    with torch.no_grad():
        n, sq, total = 0, 0.0, 0.0
        for p, r in zip(parts, rows):
            n += p.shape[0] if r is None else r.shape[0]
            for _, b in _blocks(p, r, block_size):
                sq, total = sq + b.pow(2).sum(), total + b.sum(0)
        mean = total / n
        return (2 * (sq / n - mean.pow(2).sum()) * n / max(n - 1, 1)).clamp_min(1e-12)


def _sq_norms(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(a, dim=-1).square()  # a reduction: no (rows × d) temporary, unlike a.pow(2)


def _rbf(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, inv_two_sigma2: torch.Tensor) -> torch.Tensor:
    """exp(−‖a_i − b_j‖² / (2σ²)) for one tile; in place after the matmul, so the tile is one (rows × cols) buffer."""
    sq = torch.addmm(a2[:, None] + _sq_norms(b)[None, :], a, b.T, alpha=-2)
    return sq.clamp_min_(0).mul_(-inv_two_sigma2).exp_()


def _poly_base(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T).div_(a.shape[-1]).add_(1)  # k = base³


class _BlockedMMD2(torch.autograd.Function):
    """MMD² between the rows x[x_rows] and y[y_rows] (all rows where None; y None: y is x) for the rbf or poly
    kernel. With pooled rows z and weights c (1/n² within x, 1/m² within y, −1/(nm) across),
    MMD² = Σ_ab c_ab k(z_a, z_b), and as c and k are symmetric, ∂/∂z_a = 2 Σ_b c_ab ∂₁k(z_a, z_b):
    rbf  ∂₁k = −2s·k·(z_a − z_b) (s = 1/(2σ²), a constant);  poly ∂₁k = 3(z_a·z_b/d + 1)² z_b / d.
    Forward: the upper triangle of tiles (symmetry halves the within-modality work). Backward: for each row block,
    every tile of its row recomputed and its gradient completed in fp32, then written once into the input's
    gradient; nothing but the inputs, their row indices and σ² is saved."""

    @staticmethod
    def forward(ctx, x, y, x_rows, y_rows, kernel, inv_two_sigma2, block):
        same = y is None
        y = x if same else y
        segs = ((x, x_rows), (y, y_rows))
        n, m = (t.shape[0] if r is None else r.shape[0] for t, r in segs)
        c = ((1 / n ** 2, -1 / (n * m)), (-1 / (n * m), 1 / m ** 2))
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            for p in (0, 1):
                for i, a in _blocks(*segs[p], block):
                    a2 = _sq_norms(a)
                    for q in range(p, 2):
                        for j, b in _blocks(*segs[q], block, start=i if q == p else 0):
                            k = _rbf(a, a2, b, inv_two_sigma2) if kernel == "rbf" else _poly_base(a, b).pow_(3)
                            total += (1 if (q == p and j == i) else 2) * c[p][q] * k.sum()
        ctx.save_for_backward(x, None if same else y, x_rows, y_rows, inv_two_sigma2)
        ctx.kernel, ctx.block, ctx.same, ctx.c = kernel, block, same, c
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _BlockedMMD2._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        x, y, x_rows, y_rows, inv = ctx.saved_tensors
        y = x if ctx.same else y
        segs, d = ((x, x_rows), (y, y_rows)), x.shape[-1]
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gy = None if ctx.same or not ctx.needs_input_grad[1] else torch.zeros_like(y)
        out = (gx, gx if ctx.same else gy)
        for p in (0, 1):
            if out[p] is None:
                continue
            t, rows = segs[p]
            for i, a in _blocks(t, rows, ctx.block):
                acc, rs, a2 = torch.zeros_like(a), a.new_zeros(a.shape[0]), _sq_norms(a)
                for q in (0, 1):
                    for _, b in _blocks(*segs[q], ctx.block):
                        if ctx.kernel == "rbf":
                            w = _rbf(a, a2, b, inv).mul_(ctx.c[p][q])
                            rs += w.sum(1)
                        else:
                            w = _poly_base(a, b).pow_(2).mul_(ctx.c[p][q])
                        acc.addmm_(w, b)
                if ctx.kernel == "rbf":  # −4s·(rs ⊙ a − acc), in place: no second (block × d) fp32 buffer
                    ga = acc.addcmul_(rs[:, None], a, value=-1).mul_(4 * inv * g)
                else:
                    ga = acc.mul_(6 * g / d)
                ga = ga.to(t.dtype)
                if rows is None:
                    out[p][i:i + ga.shape[0]] += ga
                else:
                    out[p].index_add_(0, rows[i:i + ga.shape[0]], ga)
        return gx, gy, None, None, None, None, None


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "rbf", bandwidth_scale: float = 1.0,
         block_size: int = 1024, x_rows: torch.Tensor | None = None,
         y_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Squared MMD (biased V-statistic) between the rows x_rows of x (n, d) and y_rows of y (m, d) (all rows where
    None; x and y may be one tensor), computed in fp32."""
    if kernel in ("linear", "l2"):
        xs, ys = (t if r is None else t[r] for t, r in ((x, x_rows), (y, y_rows)))
        diff = xs.float().mean(0) - ys.float().mean(0)
        return diff.pow(2).sum() if kernel == "linear" else torch.linalg.vector_norm(diff)
    if kernel not in ("rbf", "poly"):
        raise ValueError(kernel)
    inv = None
    if kernel == "rbf":
        inv = 1.0 / (2 * bandwidth_scale * mean_heuristic_sigma2(x, y, rows=(x_rows, y_rows), block_size=block_size))
    return _BlockedMMD2.apply(x, None if y is x else y, x_rows, y_rows, kernel, inv, block_size)


def sample_rows(n: int, cap: int, generator: torch.Generator) -> torch.Tensor | None:
    """Indices of a uniform sample of `cap` of n rows, without replacement (None: keep all rows)."""
    if cap <= 0 or n <= cap:
        return None
    return torch.randperm(n, generator=generator)[:cap]


def subsample(x: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    rows = sample_rows(x.shape[0], cap, generator)
    return x if rows is None else x[rows.to(x.device)]


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
        e = cap.inputs_embeds
        e = e.reshape(-1, e.shape[-1])  # a view (the capture is contiguous): mmd2 reads its rows in place
        g = torch.Generator().manual_seed(cap.step_seed)
        sides = []
        for mask in (cap.text_mask, cap.image_mask):  # text first: the draws of the generator follow this order
            rows = mask.reshape(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                sides.append((e.new_zeros(1, e.shape[-1]), None))
                continue
            pick = sample_rows(rows.numel(), self.cfg.rdd_max_tokens, g)
            sides.append((e, rows if pick is None else rows[pick.to(rows.device)]))
        (x, x_rows), (y, y_rows) = sides
        valid = x is e and y is e
        return mmd2(x, y, self.cfg.rdd_kernel, self.cfg.rdd_bandwidth_scale, self.cfg.rdd_block_size,
                    x_rows=x_rows, y_rows=y_rows), valid
