"""Pure-PyTorch twins of every compiled op: the reference the compiled kernels are tested against
and what `nrcore.ops` runs when `nrcore._C` is unavailable.

Each twin takes the same arguments as the public op and computes the same formula in plain
PyTorch, in the accumulation dtype (float32 for float16/bfloat16/float32 inputs, float64 for
float64). Twins do no argument or data validation: the public ops in `nrcore.ops` do that, for
both back ends. `fbr_direction_literal` is the paper-literal Algorithm 1 (explicit B x m Gram).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from nrcore.ops._backend import acc_dtype
from nrcore.ops._types import FBRStats

Tensor = torch.Tensor

__all__ = [
    "fbr_prepare",
    "fbr_direction",
    "fbr_direction_literal",
    "fbr_update_",
    "centered_gram",
    "tangent_dot",
    "tangent_kernel",
    "conv_tangent_dot",
    "conv_tangent_kernel",
    "barrier_stats",
    "barrier_coefficient",
    "barrier_combine_",
]


# ---------------------------------------------------------------------------------------------
# FBR
# ---------------------------------------------------------------------------------------------


def fbr_prepare(clean_feats: Tensor, clean_labels: Tensor, num_classes: int, *, center: bool = True) -> FBRStats:
    """Clean mean, centred class means, counts and sum, accumulated in float64."""
    m, d = clean_feats.shape
    out_dtype = acc_dtype(clean_feats.dtype)
    x = clean_feats.double()
    y = clean_labels.long()
    counts = torch.bincount(y, minlength=num_classes)
    mu = x.mean(0) if center else x.new_zeros(d)
    xc = x - mu
    sums = x.new_zeros(num_classes, d).index_add_(0, y, xc)
    means = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None].double(), 0.0)
    total = x.new_zeros(d) if center else xc.sum(0)
    basis_t = torch.cat([means, total[None]]).t().contiguous().to(out_dtype)
    return FBRStats(
        mean=mu.to(out_dtype),
        basis_t=basis_t,
        counts=counts,
        num_classes=int(num_classes),
        num_clean=int(m),
        num_present=int((counts > 0).sum()),
        sq_norm_mean=float((xc * xc).sum(1).mean()),
        center=bool(center),
    )


def _lambda_neg(stats_or_c: Union[FBRStats, int], lambda_neg: Optional[float]) -> float:
    c = stats_or_c.num_classes if isinstance(stats_or_c, FBRStats) else stats_or_c
    return 1.0 / (c - 1) if lambda_neg is None else float(lambda_neg)


def fbr_direction(
    feats: Tensor,
    labels: Tensor,
    stats: FBRStats,
    *,
    lambda_pos: float = 1.0,
    lambda_neg: Optional[float] = None,
    row_shift: bool = True,
    label_sign: bool = True,
    normalize: bool = False,
) -> Tensor:
    """Closed form of Algorithm 1's row sums (docs/method-contract.md, FBR 2):
    d_i = l+ n_y (s_iy - shift_i) - l- ((T_i - n_y s_iy) - (m - n_y) shift_i)."""
    C, m = stats.num_classes, float(stats.num_clean)
    acc = acc_dtype(feats.dtype)
    scores = (feats.to(acc) - stats.mean) @ stats.basis_t  # [B, C+1]
    s, total = scores[:, :C], scores[:, C]
    if row_shift:
        present = stats.counts > 0
        shift = s.masked_fill(~present, float("-inf")).topk(2, dim=1).values[:, 1]
    else:
        shift = torch.zeros_like(total)
    if label_sign:
        n_y = stats.counts.to(acc)[labels]
        s_y = s.gather(1, labels[:, None])[:, 0]
        lneg = _lambda_neg(stats, lambda_neg)
        d = lambda_pos * n_y * (s_y - shift) - lneg * ((total - n_y * s_y) - (m - n_y) * shift)
    else:
        d = lambda_pos * (total - m * shift)
    if normalize:
        d = d / (m * stats.sq_norm_mean)
    return d


def fbr_direction_literal(
    feats: Tensor,
    labels: Tensor,
    clean_feats: Tensor,
    clean_labels: Tensor,
    num_classes: int,
    *,
    center: bool = True,
    lambda_pos: float = 1.0,
    lambda_neg: Optional[float] = None,
    row_shift: bool = True,
    label_sign: bool = True,
) -> Tensor:
    """Algorithm 1 lines 3-13 as written: the explicit B x m centred Gram, per-class means,
    top-2 row shift, label-signed mask and row sum (the paper-literal baseline)."""
    mu = clean_feats.mean(0) if center else torch.zeros_like(clean_feats[0])
    K = (feats - mu) @ (clean_feats - mu).T  # [B, m]
    onehot = torch.nn.functional.one_hot(clean_labels, num_classes).to(K.dtype)  # [m, C]
    counts = onehot.sum(0)
    present = counts > 0
    s = (K @ onehot) / counts.clamp_min(1)  # [B, C] class means of K rows
    if row_shift:
        shift = s.masked_fill(~present, float("-inf")).topk(2, dim=1).values[:, 1]
        K = K - shift[:, None]
    if label_sign:
        same = labels[:, None] == clean_labels[None, :]
        mask = torch.where(same, K.new_tensor(lambda_pos), K.new_tensor(-_lambda_neg(num_classes, lambda_neg)))
    else:
        mask = torch.full_like(K, lambda_pos)
    return (mask * K).sum(1)


def fbr_update_(weights: Tensor, index: Tensor, direction: Tensor, step_size: float) -> Tensor:
    """w[index] = clamp(w[index] + step_size * direction, 0, 1), in place; returns weights."""
    weights[index] = (weights[index] + step_size * direction.to(weights.dtype)).clamp_(0.0, 1.0)
    return weights


def centered_gram(feats: Tensor, clean_feats: Tensor, mean: Optional[Tensor] = None) -> Tensor:
    """(feats - mean) @ (clean_feats - mean)^T, mean defaulting to the clean mean."""
    acc = acc_dtype(feats.dtype)
    clean = clean_feats.to(acc)
    mu = clean.mean(0) if mean is None else mean.to(acc)
    return (feats.to(acc) - mu) @ (clean - mu).T


# ---------------------------------------------------------------------------------------------
# Per-sample Jacobian-kernel products
# ---------------------------------------------------------------------------------------------


def per_example_grads(acts: Tensor, grads: Tensor) -> Tensor:
    """G_i = sum_t grads[i, t] outer acts[i, t]: [B, q, p]."""
    acc = acc_dtype(acts.dtype)
    return torch.einsum("btq,btp->bqp", grads.to(acc), acts.to(acc))


def tangent_dot(acts: Tensor, grads: Tensor, direction: Tensor, *, strategy: str = "auto") -> Tensor:
    """<G_i, direction>: [B] for direction [q, p], [B, k] for [k, q, p]."""
    G = per_example_grads(acts, grads)
    D = direction.to(G.dtype)
    return torch.einsum("bqp,qp->b", G, D) if D.dim() == 2 else torch.einsum("bqp,kqp->bk", G, D)


def tangent_kernel(acts_a: Tensor, grads_a: Tensor, acts_b: Tensor, grads_b: Tensor, *, strategy: str = "auto") -> Tensor:
    """K_ij = <G_i, G'_j>: [B, M]."""
    Ga = per_example_grads(acts_a, grads_a).flatten(1)
    Gb = per_example_grads(acts_b, grads_b).flatten(1)
    return Ga @ Gb.T


def _patches(x: Tensor, grads: Tensor, kernel_size, stride, padding, dilation):
    cols = torch.nn.functional.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2), grads.flatten(2).transpose(1, 2)


def conv_tangent_dot(x: Tensor, grads: Tensor, direction: Tensor, *, kernel_size, stride=1, padding=0, dilation=1, strategy: str = "auto") -> Tensor:
    """tangent_dot on F.unfold's patches of a Conv2d input x and its output gradient grads."""
    acts, g = _patches(x, grads, kernel_size, stride, padding, dilation)
    q = grads.shape[1]
    single = direction.dim() in (2, 4)
    D = (direction[None] if single else direction).reshape(-1, q, acts.shape[2])
    out = tangent_dot(acts, g, D)
    return out[:, 0] if single else out


def conv_tangent_kernel(x_a: Tensor, grads_a: Tensor, x_b: Tensor, grads_b: Tensor, *, kernel_size, stride=1, padding=0, dilation=1, strategy: str = "auto") -> Tensor:
    """tangent_kernel on F.unfold's patches of two batches of a Conv2d layer."""
    geometry = (kernel_size, stride, padding, dilation)
    return tangent_kernel(*_patches(x_a, grads_a, *geometry), *_patches(x_b, grads_b, *geometry))


# ---------------------------------------------------------------------------------------------
# Barrier reductions
# ---------------------------------------------------------------------------------------------


def barrier_stats(grads_f_w: Sequence[Tensor], grads_q_w: Sequence[Tensor], grads_q_alpha: Sequence[Tensor]) -> Tensor:
    """[<gradF_w, gradQ_w>, |gradQ_w|^2, |gradQ_alpha|^2, non-finite flag], one tensor at a time,
    accumulated in float64."""
    device = grads_q_w[0].device
    dot = torch.zeros((), dtype=torch.float64, device=device)
    sq_w = torch.zeros_like(dot)
    sq_alpha = torch.zeros_like(dot)
    for f, q in zip(grads_f_w, grads_q_w):
        q64 = q.reshape(-1).double()
        dot += torch.dot(f.reshape(-1).double(), q64)
        sq_w += torch.dot(q64, q64)
    for a in grads_q_alpha:
        a64 = a.reshape(-1).double()
        sq_alpha += torch.dot(a64, a64)
    stats = torch.stack([dot, sq_w, sq_alpha, torch.zeros_like(dot)])
    stats[3] = (~torch.isfinite(stats[:3]).all()).double()
    return stats


def barrier_coefficient(stats: Tensor, delta: float) -> Tensor:
    """max(delta - dot / (sq_w + sq_alpha), 0); 0 when the denominator is 0 or the flag is set."""
    stats = stats.double()
    denom = stats[1] + stats[2]
    ok = (denom > 0) & (stats[3] == 0)
    beta = (delta - stats[0] / torch.where(ok, denom, torch.ones_like(denom))).clamp_min(0.0)
    return torch.where(ok, beta, torch.zeros_like(beta))


def barrier_combine_(
    outs: Sequence[Tensor],
    grads_f: Optional[Sequence[Tensor]],
    grads_q: Sequence[Tensor],
    coef: Union[float, Tensor],
    *,
    skip_if: Optional[Tensor] = None,
) -> List[Tensor]:
    """outs[k] = grads_f[k] + coef * grads_q[k] (coef * grads_q[k] when grads_f is None); nothing
    when `skip_if` is nonzero."""
    if skip_if is not None and bool(skip_if != 0):
        return list(outs)
    for k, (out, q) in enumerate(zip(outs, grads_q)):
        acc = acc_dtype(q.dtype)
        c = coef.to(acc) if isinstance(coef, Tensor) else coef
        q = q.to(acc)
        out.copy_(c * q if grads_f is None else grads_f[k].to(acc) + c * q)
    return list(outs)
