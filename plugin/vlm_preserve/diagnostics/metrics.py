"""The diagnostic metrics: pure torch/numpy, one layer at a time, no model and no adapter.

Each metric has a reference function (all data in memory, the formula as written in the paper) and a
streaming accumulator fed one sample at a time, whose state is a fixed-size sufficient statistic:

| metric | accumulator state | streamed result vs in-memory |
|---|---|---|
| mixing: mean pairwise distance | sum of per-sample means, count | exact |
| mixing: RBF-MMD² | a uniform reservoir of ≤ `cap` tokens per modality | exact while tokens ≤ cap, else a uniform subsample (error O(1/√cap), as the RDD cap) |
| effdim, redundancy | n, Σx, Σxxᵀ in fp64 (d × d per layer) | exact up to fp64 rounding |
| patch cohesion / coupling | per-image values summed, count | exact |
| probe | one mean-pooled vector per image (N × d per layer) | exact: the probe needs them all |

All arithmetic is fp32 or wider, whatever dtype the model ran in.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..regularizers.rdd import mmd2

EFFDIM_VARIANCE = 0.95  # PRe supplement eq. 6


# ---- reference definitions ---------------------------------------------------------------------------

def mean_pairwise_distance(t: torch.Tensor, v: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """mean_{i,j} ‖t_i − v_j‖₂ over all (text, visual) pairs of one sample: RRVLM's D = E‖h_t(x) − h_v(y)‖
    with x, y the text and image of the same sample. Row blocks bound memory to block × len(v)."""
    t, v = t.float(), v.float()
    total = sum(torch.cdist(t[s:s + block], v).sum() for s in range(0, t.shape[0], block))
    return total / (t.shape[0] * v.shape[0])


def effective_dimension(cov: torch.Tensor, variance: float = EFFDIM_VARIANCE) -> int:
    """min k such that the k largest eigenvalues of the covariance explain `variance` of the total
    (PRe supplement eq. 6)."""
    eig = torch.linalg.eigvalsh(cov.double()).flip(0).clamp_min(0)
    frac = eig.cumsum(0) / eig.sum()
    # the tolerance keeps a planted spectrum that sits exactly on the threshold from flipping on rounding
    return int((frac < variance - 1e-9).sum()) + 1


def redundancy(cov: torch.Tensor) -> float:
    """Mean |Pearson correlation| over off-diagonal pairs of feature dimensions (PRe supplement eq. 7).
    Constant dimensions have no correlation and are left out (D counts the others)."""
    cov = cov.double()
    std = cov.diagonal().clamp_min(0).sqrt()
    keep = std > 1e-12 * std.max().clamp_min(1e-300)
    d = int(keep.sum())
    if d < 2:
        return float("nan")
    corr = cov[keep][:, keep] / (std[keep][:, None] * std[keep][None, :])
    return float((corr.abs().sum() - corr.diagonal().abs().sum()) / (d * (d - 1)))


def cohesion_coupling(feats: torch.Tensor, labels: torch.Tensor) -> tuple[float | None, float | None]:
    """One image's intra-object cohesion and inter-object coupling (PRe supplement eqs. 3, 4).

    feats (N, d) visual tokens, labels (N,) class per patch (< 0: ignored). With u the unit vectors and
    s_c = Σ_{i∈S_c} u_i, the mean cosine over pairs i≠j in class c is (‖s_c‖² − n_c) / (n_c(n_c − 1)),
    and over pairs across classes c≠c' it is s_c·s_c' / (n_c n_c'): O(N·d), no N × N matrix.
    Cohesion averages over classes with ≥ 2 patches, coupling over ordered class pairs; None where the
    image has no such class (pair)."""
    keep = labels >= 0
    u = torch.nn.functional.normalize(feats[keep].float(), dim=-1)
    lab = labels[keep]
    classes = lab.unique()
    sums = torch.stack([u[lab == c].sum(0) for c in classes]) if len(classes) else u.new_zeros(0, u.shape[-1])
    n = torch.stack([(lab == c).sum() for c in classes]).to(u) if len(classes) else u.new_zeros(0)
    multi = n >= 2
    cohesion = None
    if multi.any():
        cohesion = float(((sums[multi].pow(2).sum(-1) - n[multi]) / (n[multi] * (n[multi] - 1))).mean())
    coupling = None
    if len(classes) >= 2:
        cross = (sums @ sums.T) / (n[:, None] * n[None, :])
        off = ~torch.eye(len(classes), dtype=torch.bool, device=cross.device)
        coupling = float(cross[off].mean())
    return cohesion, coupling


def probe_accuracy(x: np.ndarray, y: list, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated accuracy of a logistic-regression probe (standardised features), stratified folds
    (PRe's global functional degradation). Also returns the majority-class rate as the chance level."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("the probe metric needs scikit-learn: pip install 'vlm-preserve-plugin[diagnose]' "
                          "(or pip install scikit-learn)") from e
    classes, counts = np.unique(np.asarray(y, dtype=object).astype(str), return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"probe needs at least 2 distinct labels; all {len(y)} labelled images have "
                         f"label {classes[0]!r} (give each sample a 'label' naming its class).")
    if counts.min() < 2:
        rare = ", ".join(repr(c) for c in classes[counts < 2])
        raise ValueError(f"probe needs at least 2 images per label for cross-validation; label(s) {rare} "
                         "have 1. Add images or drop those labels.")
    k = int(min(folds, counts.min()))
    labels = np.asarray(y, dtype=object).astype(str)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    scores = cross_val_score(clf, x, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return {"accuracy": float(scores.mean()), "accuracy_std": float(scores.std()), "folds": k,
            "chance": float(counts.max() / counts.sum())}


# ---- streaming accumulators (one per layer) ----------------------------------------------------------

class Reservoir:
    """A uniform random sample without replacement of at most `cap` rows from a stream: every row gets a
    random key and the `cap` smallest keys are kept (equivalent to a random permutation's prefix)."""

    def __init__(self, cap: int, generator: torch.Generator):
        self.cap, self.g = cap, generator
        self.rows, self.keys = None, None

    def add(self, x: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.g).to(x.device)
        rows = x.float()
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.cap:
            keep = keys.topk(self.cap, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


class MixingStats:
    """RRVLM Fig. 3 at one layer: text vs visual representations of the same samples."""

    def __init__(self, cap: int = 2048, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.text, self.visual = Reservoir(cap, g), Reservoir(cap, g)
        self.distance_sum, self.n = 0.0, 0

    def update(self, t: torch.Tensor, v: torch.Tensor) -> None:
        if t.shape[0] == 0 or v.shape[0] == 0:
            return
        self.distance_sum += float(mean_pairwise_distance(t, v))
        self.n += 1
        self.text.add(t)
        self.visual.add(v)

    def result(self) -> dict:
        if self.n == 0:
            return {"pairwise_distance": math.nan, "mmd2": math.nan}
        return {"pairwise_distance": self.distance_sum / self.n,
                "mmd2": float(mmd2(self.text.rows, self.visual.rows, "rbf"))}


class CovarianceStats:
    """n, Σ(x − x₀), Σ(x − x₀)(x − x₀)ᵀ in fp64; x₀ = the first sample's mean, a shift that keeps the
    one-pass covariance from cancelling catastrophically when features have a large common offset."""

    def __init__(self):
        self.n, self.shift, self.s, self.ss = 0, None, None, None

    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.s = torch.zeros_like(self.shift)
            self.ss = x.new_zeros(x.shape[1], x.shape[1])
        x = x - self.shift
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += x.T @ x

    def covariance(self) -> torch.Tensor:
        mean = self.s / self.n
        return (self.ss - self.n * torch.outer(mean, mean)) / max(self.n - 1, 1)

    def result(self) -> dict:
        if self.n < 2:
            return {"effective_dim": math.nan, "redundancy": math.nan}
        cov = self.covariance()
        return {"effective_dim": effective_dimension(cov), "redundancy": redundancy(cov)}


class PatchStats:
    """Cohesion and coupling averaged over images; contrast = mean cohesion / mean coupling (a ratio of
    the averages: a per-image ratio explodes where an image's coupling is near 0)."""

    def __init__(self):
        self.cohesion, self.n_cohesion, self.coupling, self.n_coupling = 0.0, 0, 0.0, 0

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        coh, cpl = cohesion_coupling(feats, labels)
        if coh is not None:
            self.cohesion += coh
            self.n_cohesion += 1
        if cpl is not None:
            self.coupling += cpl
            self.n_coupling += 1

    def result(self) -> dict:
        coh = self.cohesion / self.n_cohesion if self.n_cohesion else math.nan
        cpl = self.coupling / self.n_coupling if self.n_coupling else math.nan
        return {"cohesion": coh, "coupling": cpl, "contrast": coh / cpl if cpl else math.nan}


class ProbeStats:
    def __init__(self):
        self.x, self.y = [], []

    def update(self, v: torch.Tensor, label) -> None:
        if v.shape[0]:
            self.x.append(v.float().mean(0).cpu().numpy())
            self.y.append(label)

    def result(self) -> dict:
        return probe_accuracy(np.stack(self.x), self.y)
