"""Feature-based reweighting (FBR paper, Algorithm 1) in the closed form of docs/method-contract.md (FBR 2).

    stats = fbr_prepare(clean_feats, clean_labels, C)            # once per epoch
    d = fbr_direction(feats, labels, stats)                       # per batch, [B]
    fbr_update_(weights, index, d, step_size)                     # w <- clip(w + step * d)

Sign: Algorithm 1 line 14 writes `w - alpha d`; the paper's text and theory need `w + alpha d`
(clean, aligned examples go up), which is what nrcore does (docs/method-contract.md, FBR 1).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from nrcore.ops import _backend as B
from nrcore.ops import _validate as V
from nrcore.ops import reference
from nrcore.ops._types import FBRStats

Tensor = torch.Tensor


def _out_of_range(op: str, name: str, values: Tensor, upper: int) -> B.OpError:
    """The error for integer `values` outside [0, upper): the valid range and the first offender
    (read on the host: this is the error path, where a sync costs nothing that matters)."""
    bad = ((values < 0) | (values >= upper)).nonzero()
    where = f"; {name}[{int(bad[0, 0])}] is {int(values[bad[0, 0]])}" if len(bad) else ""
    what = "class ids" if "label" in name else "positions"
    return B.OpError(f"{op}: {name} must hold {what} in [0, {upper - 1}]{where}")


def _raise(op: str, status: int, *, labels: Tuple[str, Tensor, int], named=()) -> None:
    """Turn a compiled kernel's status word into an error; `labels` is (name, tensor, upper
    bound) of the integer argument the kernel range-checks."""
    if status & B.BAD_INDEX:
        raise _out_of_range(op, *labels)
    if status & B.DUPLICATE_INDEX:
        raise B.OpError(f"{op}: index contains duplicate entries")
    if status & B.NON_FINITE:
        raise B.OpError(B.first_nonfinite(op, named))
    if status:
        raise B.OpError(f"{op}: {B.describe_status(status)}")


def _check_labels(op: str, name: str, labels: Tensor, upper: int) -> None:
    """Reference-path data check (the compiled kernels check as they go)."""
    if labels.numel() and (bool((labels < 0).any()) or bool((labels >= upper).any())):
        raise _out_of_range(op, name, labels, upper)


def _check_finite(op: str, out: Tensor, named) -> None:
    if not bool(torch.isfinite(out).all()):
        raise B.OpError(B.first_nonfinite(op, named))


# ---------------------------------------------------------------------------------------------
# fbr_prepare
# ---------------------------------------------------------------------------------------------


def _fbr_prepare_impl(clean_feats: Tensor, clean_labels: Tensor, num_classes: int, center: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    op = "fbr_prepare"
    if not B.compiled_for(clean_feats.device):
        _check_labels(op, "clean_labels", clean_labels, num_classes)
        s = reference.fbr_prepare(clean_feats, clean_labels, num_classes, center=center)
        if not torch.isfinite(clean_feats).all():
            raise B.OpError(f"{op}: clean_feats contains non-finite values (NaN or inf)")
        return s.mean, s.basis_t, s.counts, torch.tensor([s.sq_norm_mean], dtype=torch.float64, device=clean_feats.device)
    m, d = clean_feats.shape
    acc = B.acc_dtype(clean_feats.dtype)
    mean = clean_feats.new_empty(d, dtype=acc)
    basis_t = clean_feats.new_empty(d, num_classes + 1, dtype=acc)
    counts = clean_labels.new_empty(num_classes, dtype=torch.int64)
    sq = clean_feats.new_empty(1, dtype=torch.float64)
    dev, stream = B.device_args(clean_feats)
    status = B._C.fbr_prepare(
        dev, stream, dtype=B.DTYPE_CODES[clean_feats.dtype], m=m, d=d, num_classes=num_classes,
        feats=clean_feats.data_ptr(), feats_rs=clean_feats.stride(0), feats_cs=clean_feats.stride(1),
        labels=clean_labels.data_ptr(), labels_s=clean_labels.stride(0), center=center, mean=mean.data_ptr(),
        basis_t=basis_t.data_ptr(), counts=counts.data_ptr(), sq_norm_mean=sq.data_ptr(), nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.check_errors(clean_feats.device)  # once per epoch: a sync is fine here
    _raise(op, status, labels=("clean_labels", clean_labels, num_classes), named=[("clean_feats", clean_feats)])
    return mean, basis_t, counts, sq


_fbr_prepare_op = torch.library.custom_op("nrcore::fbr_prepare", _fbr_prepare_impl, mutates_args=())


@_fbr_prepare_op.register_fake
def _(clean_feats, clean_labels, num_classes, center):
    d = clean_feats.shape[1]
    acc = B.acc_dtype(clean_feats.dtype)
    return (
        clean_feats.new_empty(d, dtype=acc),
        clean_feats.new_empty(d, num_classes + 1, dtype=acc),
        clean_labels.new_empty(num_classes, dtype=torch.int64),
        clean_feats.new_empty(1, dtype=torch.float64),
    )


def fbr_prepare(clean_feats: Tensor, clean_labels: Tensor, num_classes: int, *, center: bool = True) -> FBRStats:
    """Clean-set statistics for `fbr_direction`, computed once per epoch.

    clean_feats [m, d] (float32/float64; CUDA also float16/bfloat16), clean_labels [m] integers in
    [0, num_classes). center=True centres on the clean mean mu (Algorithm 1 lines 3-4),
    center=False uses mu = 0. Returns FBRStats (mean [d], basis_t [d, C+1], counts [C], ...) in
    the accumulation dtype. Sums are accumulated in float64. On CUDA this op synchronises once
    (to validate the labels and read the class counts), which is fine once per epoch.
    """
    op = "fbr_prepare"
    feats = V.floating(op, "clean_feats", clean_feats, 2)
    labels = V.index(op, "clean_labels", clean_labels, feats.shape[0])
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{op}: num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"{op}: num_classes must be >= 2, got {num_classes}")
    if feats.shape[0] == 0:
        raise ValueError(f"{op}: the clean set is empty (clean_feats has 0 rows)")
    if feats.shape[1] == 0:
        raise ValueError(f"{op}: clean_feats has 0 feature columns")
    V.same_device(op, clean_feats=feats, clean_labels=labels)
    mean, basis_t, counts, sq = B.call(_fbr_prepare_op, _fbr_prepare_impl, feats, labels, num_classes, bool(center))
    return FBRStats(
        mean=mean,
        basis_t=basis_t,
        counts=counts,
        num_classes=num_classes,
        num_clean=int(feats.shape[0]),
        num_present=int((counts > 0).sum()),
        sq_norm_mean=float(sq[0]),
        center=bool(center),
    )


# ---------------------------------------------------------------------------------------------
# fbr_direction
# ---------------------------------------------------------------------------------------------


def _fbr_direction_impl(
    feats: Tensor,
    labels: Tensor,
    mean: Tensor,
    basis_t: Tensor,
    counts: Tensor,
    use_total: bool,
    row_shift: bool,
    label_sign: bool,
    lambda_pos: float,
    lambda_neg: float,
    scale: float,
) -> Tensor:
    op = "fbr_direction"
    C = counts.shape[0]
    named = [("feats", feats), ("stats", [mean, basis_t])]
    if not B.compiled_for(feats.device):
        _check_labels(op, "labels", labels, C)
        stats = FBRStats(mean, basis_t, counts, C, int(counts.sum()), int((counts > 0).sum()), 1.0, not use_total)
        out = scale * reference.fbr_direction(
            feats, labels, stats, lambda_pos=lambda_pos, lambda_neg=lambda_neg, row_shift=row_shift, label_sign=label_sign
        )
        _check_finite(op, out, named)
        return out
    batch, d = feats.shape
    out = feats.new_empty(batch, dtype=B.acc_dtype(feats.dtype))
    dev, stream = B.device_args(feats)
    status = B._C.fbr_direction(
        dev, stream, dtype=B.DTYPE_CODES[feats.dtype], batch=batch, d=d, num_classes=C, feats=feats.data_ptr(),
        feats_rs=feats.stride(0), feats_cs=feats.stride(1), labels=labels.data_ptr(), labels_s=labels.stride(0),
        mean=mean.data_ptr(), basis_t=basis_t.data_ptr(), counts=counts.data_ptr(), use_total=use_total,
        row_shift=row_shift, label_sign=label_sign, lambda_pos=lambda_pos, lambda_neg=lambda_neg, scale=scale,
        out=out.data_ptr(), nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _raise(op, status, labels=("labels", labels, C), named=named)
    return out


_fbr_direction_op = torch.library.custom_op("nrcore::fbr_direction", _fbr_direction_impl, mutates_args=())


@_fbr_direction_op.register_fake
def _(feats, labels, mean, basis_t, counts, use_total, row_shift, label_sign, lambda_pos, lambda_neg, scale):
    return feats.new_empty(feats.shape[0], dtype=B.acc_dtype(feats.dtype))


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
    """FBR ascent direction d_i = sum_j Kbar_ij for a batch (positive = up-weight).

    feats [B, d], labels [B] in [0, C), stats from `fbr_prepare` -> [B] in the accumulation dtype.
    With s_ic = (phi_i - mu).M_c, T_i = (phi_i - mu).sum_j(phi_j - mu) (0 when centred),
    shift_i = the second largest s_ic over classes present in the clean set (0 if row_shift=False)
    and n_y, s_iy at the example's label:
        label_sign=True:  d_i = l+ n_y (s_iy - shift_i) - l- ((T_i - n_y s_iy) - (m - n_y) shift_i)
        label_sign=False: d_i = l+ (T_i - m shift_i)
    lambda_neg=None means 1/(C-1). normalize=True divides by m * mean_j |phi_j - mu|^2. With a
    balanced clean set and the default lambdas the shift cancels (docs/method-contract.md, FBR 3).
    Cost O(B C d), no B x m matrix. Raises ValueError for labels outside [0, C) or a non-finite
    result on the CPU; on CUDA see nrcore.ops.check_errors.
    """
    op = "fbr_direction"
    feats = V.floating(op, "feats", feats, 2)
    labels = V.index(op, "labels", labels, feats.shape[0])
    if not isinstance(stats, FBRStats):
        raise TypeError(f"{op}: stats must be the FBRStats returned by fbr_prepare, got {type(stats).__name__}")
    if feats.shape[1] != stats.feature_dim:
        raise ValueError(f"{op}: feats has {feats.shape[1]} features but stats was prepared with {stats.feature_dim}")
    if B.acc_dtype(feats.dtype) != stats.basis_t.dtype:
        raise TypeError(f"{op}: feats has dtype {feats.dtype} but stats was prepared from {stats.basis_t.dtype} features")
    V.same_device(op, feats=feats, labels=labels, stats=stats.basis_t)
    lambda_pos = V.number(op, "lambda_pos", lambda_pos)
    lambda_neg = 1.0 / (stats.num_classes - 1) if lambda_neg is None else V.number(op, "lambda_neg", lambda_neg)
    if row_shift and stats.num_present < 2:
        raise ValueError(f"{op}: row_shift needs at least 2 classes in the clean set, stats has {stats.num_present}")
    scale = 1.0
    if normalize:
        if not stats.sq_norm_mean > 0:
            raise ValueError(f"{op}: normalize=True but the clean features have zero spread (sq_norm_mean = 0)")
        scale = 1.0 / (stats.num_clean * stats.sq_norm_mean)
    return B.call(
        _fbr_direction_op, _fbr_direction_impl, feats, labels, stats.mean, stats.basis_t, stats.counts,
        not stats.center, bool(row_shift), bool(label_sign), lambda_pos, lambda_neg, scale,
    )


# ---------------------------------------------------------------------------------------------
# fbr_update_
# ---------------------------------------------------------------------------------------------


def _fbr_update_impl(weights: Tensor, index: Tensor, direction: Tensor, step_size: float) -> None:
    op = "fbr_update_"
    if not B.compiled_for(weights.device):
        _check_labels(op, "index", index, weights.shape[0])
        if index.numel() and index.unique().numel() != index.numel():
            raise B.OpError(f"{op}: index contains duplicate entries")
        if not bool(torch.isfinite(direction).all()):
            raise B.OpError(f"{op}: direction contains non-finite values (NaN or inf)")
        reference.fbr_update_(weights, index, direction, step_size)
        return
    dev, stream = B.device_args(weights)
    status = B._C.fbr_update(
        dev, stream, dtype=B.DTYPE_CODES[weights.dtype], n=weights.shape[0], batch=index.shape[0],
        weights=weights.data_ptr(), weights_s=weights.stride(0), index=index.data_ptr(), index_s=index.stride(0),
        direction=direction.data_ptr(), direction_s=direction.stride(0), step_size=step_size, nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _raise(op, status, labels=("index", index, weights.shape[0]), named=[("direction", direction)])


_fbr_update_op = torch.library.custom_op("nrcore::fbr_update_", _fbr_update_impl, mutates_args=("weights",))


@_fbr_update_op.register_fake
def _(weights, index, direction, step_size):
    return None


def fbr_update_(weights: Tensor, index: Tensor, direction: Tensor, step_size: float) -> Tensor:
    """In place: weights[index] = clamp(weights[index] + step_size * direction, 0, 1); returns weights.

    weights [n] float32/float64 (the persistent per-example weights), index [B] distinct integers
    in [0, n), direction [B] (cast to the weights' dtype), step_size a finite float. On the CPU a
    bad index, a duplicate or a non-finite direction raises ValueError before anything is
    written. On CUDA the kernel skips such entries and records the problem for
    nrcore.ops.check_errors (duplicates are not detected there: index_put semantics).
    """
    op = "fbr_update_"
    weights = V.tensor(op, "weights", weights, 1)
    if weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: weights must be float32 or float64, got {weights.dtype}")
    index = V.index(op, "index", index)
    direction = V.floating(op, "direction", direction, 1)
    if direction.shape[0] != index.shape[0]:
        raise ValueError(f"{op}: direction has length {direction.shape[0]} but index has {index.shape[0]}")
    step_size = V.number(op, "step_size", step_size)
    V.same_device(op, weights=weights, index=index, direction=direction)
    if index.shape[0] == 0:
        return weights
    if direction.dtype != weights.dtype:
        direction = direction.to(weights.dtype)
    B.call(_fbr_update_op, _fbr_update_impl, weights, index, direction, step_size)
    return weights


# ---------------------------------------------------------------------------------------------
# centered_gram
# ---------------------------------------------------------------------------------------------


def centered_gram(feats: Tensor, clean_feats: Tensor, mean: Optional[Tensor] = None) -> Tensor:
    """The explicit centred Gram K = (feats - mean)(clean_feats - mean)^T, [B, m], for analysis
    and plots (training uses the closed form). mean [d] defaults to the clean mean.

    Not a compiled kernel: this is one dense GEMM, which MKL/cuBLAS do better than a hand-written
    kernel (a compiled version measured 0.8x the BLAS twin here), so it validates and runs the
    twin. It checks the result for non-finite values, which on CUDA synchronises: keep it out of
    the training loop."""
    op = "centered_gram"
    feats = V.floating(op, "feats", feats, 2)
    clean_feats = V.floating(op, "clean_feats", clean_feats, 2)
    V.same_dtype(op, "feats", feats, clean_feats=clean_feats)
    if clean_feats.shape[1] != feats.shape[1]:
        raise ValueError(f"{op}: clean_feats has {clean_feats.shape[1]} features but feats has {feats.shape[1]}")
    if clean_feats.shape[0] == 0:
        raise ValueError(f"{op}: the clean set is empty (clean_feats has 0 rows)")
    acc = B.acc_dtype(feats.dtype)
    if mean is None:
        mean = clean_feats.to(acc).mean(0)
    else:
        mean = V.floating(op, "mean", mean, 1)
        if mean.shape[0] != feats.shape[1]:
            raise ValueError(f"{op}: mean has length {mean.shape[0]} but feats has {feats.shape[1]} features")
        mean = mean.to(acc).contiguous()
    V.same_device(op, feats=feats, clean_feats=clean_feats, mean=mean)
    out = reference.centered_gram(feats, clean_feats, mean)
    _check_finite(op, out, [("feats", feats), ("clean_feats", clean_feats), ("mean", mean)])
    return out
