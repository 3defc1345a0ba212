"""Per-sample Jacobian-kernel products for one linear map, without per-example gradients in
memory unless that is cheaper.

For a layer with per-example inputs acts[i, t] (p) and output gradients grads[i, t] (q), example
i's weight gradient is G_i = sum_t grads[i, t] outer acts[i, t] (q x p); T = 1 for nn.Linear on
[B, p] inputs, T = output positions for a Conv2d (acts = its unfolded patches). The ops contract
G_i with a direction or with another batch's G'_j, choosing per call between the ghost form
(never forming G_i) and explicit per-example gradients (formed a chunk of examples at a time) by
multiply-add count. `PerSampleGradRecorder` (nrcore.ops.recorder) records acts/grads of whole
models and sums these over layers.
"""

from __future__ import annotations

import torch

from nrcore.ops import _backend as B
from nrcore.ops import _validate as V
from nrcore.ops import reference

Tensor = torch.Tensor

STRATEGIES = {"auto": 0, "ghost": 1, "explicit": 2}


def _strategy(op: str, strategy) -> int:
    if strategy not in STRATEGIES:
        raise ValueError(f"{op}: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return STRATEGIES[strategy]


def _finish(op: str, status: int, named) -> None:
    if status & B.NON_FINITE:
        raise B.OpError(B.first_nonfinite(op, named))
    if status:
        raise B.OpError(f"{op}: {B.describe_status(status)}")


@torch.library.custom_op("nrcore::tangent_dot", mutates_args=())
def _tangent_dot_op(acts: Tensor, grads: Tensor, direction: Tensor, strategy: int) -> Tensor:
    op = "tangent_dot"
    named = [("acts", acts), ("grads", grads), ("direction", direction)]
    if not B.compiled_for(acts.device):
        out = reference.tangent_dot(acts, grads, direction)
        _finish(op, 0 if bool(torch.isfinite(out).all()) else B.NON_FINITE, named)
        return out
    batch, T, p = acts.shape
    q, k = grads.shape[2], direction.shape[0]
    out = acts.new_empty(batch, k, dtype=B.acc_dtype(acts.dtype))
    dev, stream = B.device_args(acts)
    status = B._C.tangent_dot(
        dev, stream, B.DTYPE_CODES[acts.dtype], batch, T, p, q, k, acts.data_ptr(), *acts.stride(), grads.data_ptr(),
        *grads.stride(), direction.data_ptr(), out.data_ptr(), strategy, B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _finish(op, status, named)
    return out


@_tangent_dot_op.register_fake
def _(acts, grads, direction, strategy):
    return acts.new_empty(acts.shape[0], direction.shape[0], dtype=B.acc_dtype(acts.dtype))


def _check_pair(op: str, suffix: str, acts, grads):
    acts = V.floating(op, "acts" + suffix, acts, 3)
    grads = V.floating(op, "grads" + suffix, grads, 3)
    V.same_dtype(op, "acts" + suffix, acts, **{"grads" + suffix: grads})
    if acts.shape[:2] != grads.shape[:2]:
        raise ValueError(
            f"{op}: acts{suffix} {tuple(acts.shape)} and grads{suffix} {tuple(grads.shape)} must agree in "
            "the first two dimensions (examples, positions)"
        )
    return acts, grads


def tangent_dot(acts: Tensor, grads: Tensor, direction: Tensor, *, strategy: str = "auto") -> Tensor:
    """<G_i, direction> for every example i.

    acts [B, T, p], grads [B, T, q], direction [q, p] -> [B], or a batch of directions
    [k, q, p] -> [B, k]; G_i = sum_t grads[i, t] outer acts[i, t]. Inputs may be non-contiguous
    (e.g. a transposed unfold); direction is made contiguous. strategy: "auto" (cheaper of
    ghost, k*T*p*q per example, and explicit, T*p*q + k*p*q), "ghost" or "explicit". Output in the
    accumulation dtype; a non-finite result raises ValueError on the CPU.
    """
    op = "tangent_dot"
    acts, grads = _check_pair(op, "", acts, grads)
    direction = V.floating(op, "direction", direction)
    V.same_dtype(op, "acts", acts, direction=direction)
    q, p = grads.shape[2], acts.shape[2]
    if direction.dim() not in (2, 3) or tuple(direction.shape[-2:]) != (q, p):
        raise ValueError(f"{op}: direction must have shape [q, p] = [{q}, {p}] or [k, {q}, {p}], got {tuple(direction.shape)}")
    V.same_device(op, acts=acts, grads=grads, direction=direction)
    code = _strategy(op, strategy)
    single = direction.dim() == 2
    D = (direction[None] if single else direction).contiguous()
    if acts.shape[0] == 0 or D.shape[0] == 0:  # empty output (empty sums, T = 0, go to the kernel)
        out = acts.new_zeros(acts.shape[0], D.shape[0], dtype=B.acc_dtype(acts.dtype))
    else:
        out = _tangent_dot_op(acts, grads, D, code)
    return out[:, 0] if single else out


@torch.library.custom_op("nrcore::tangent_kernel", mutates_args=())
def _tangent_kernel_op(acts_a: Tensor, grads_a: Tensor, acts_b: Tensor, grads_b: Tensor, strategy: int) -> Tensor:
    op = "tangent_kernel"
    named = [("acts_a", acts_a), ("grads_a", grads_a), ("acts_b", acts_b), ("grads_b", grads_b)]
    if not B.compiled_for(acts_a.device):
        out = reference.tangent_kernel(acts_a, grads_a, acts_b, grads_b)
        _finish(op, 0 if bool(torch.isfinite(out).all()) else B.NON_FINITE, named)
        return out
    batch_a, T, p = acts_a.shape
    batch_b, S = acts_b.shape[:2]
    q = grads_a.shape[2]
    out = acts_a.new_empty(batch_a, batch_b, dtype=B.acc_dtype(acts_a.dtype))
    dev, stream = B.device_args(acts_a)
    status = B._C.tangent_kernel(
        dev, stream, B.DTYPE_CODES[acts_a.dtype], batch_a, T, batch_b, S, p, q, acts_a.data_ptr(), *acts_a.stride(),
        grads_a.data_ptr(), *grads_a.stride(), acts_b.data_ptr(), *acts_b.stride(), grads_b.data_ptr(),
        *grads_b.stride(), out.data_ptr(), strategy, B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _finish(op, status, named)
    return out


@_tangent_kernel_op.register_fake
def _(acts_a, grads_a, acts_b, grads_b, strategy):
    return acts_a.new_empty(acts_a.shape[0], acts_b.shape[0], dtype=B.acc_dtype(acts_a.dtype))


def tangent_kernel(acts_a: Tensor, grads_a: Tensor, acts_b: Tensor, grads_b: Tensor, *, strategy: str = "auto") -> Tensor:
    """K_ij = <G_i, G'_j> between the per-example gradients of two batches of the same layer.

    acts_a [B, T, p], grads_a [B, T, q], acts_b [M, S, p], grads_b [M, S, q] -> [B, M].
    strategy "auto" picks the ghost form (B M T S (p + q) multiply-adds) or explicit gradients
    ((B T + M S) p q + B M p q) by cost; "ghost"/"explicit" force one.
    """
    op = "tangent_kernel"
    acts_a, grads_a = _check_pair(op, "_a", acts_a, grads_a)
    acts_b, grads_b = _check_pair(op, "_b", acts_b, grads_b)
    V.same_dtype(op, "acts_a", acts_a, acts_b=acts_b)
    if acts_a.shape[2] != acts_b.shape[2] or grads_a.shape[2] != grads_b.shape[2]:
        raise ValueError(
            f"{op}: the two batches must come from the same layer: acts_a/acts_b widths {acts_a.shape[2]}/"
            f"{acts_b.shape[2]}, grads_a/grads_b widths {grads_a.shape[2]}/{grads_b.shape[2]}"
        )
    V.same_device(op, acts_a=acts_a, grads_a=grads_a, acts_b=acts_b, grads_b=grads_b)
    code = _strategy(op, strategy)
    if acts_a.shape[0] == 0 or acts_b.shape[0] == 0:
        return acts_a.new_zeros(acts_a.shape[0], acts_b.shape[0], dtype=B.acc_dtype(acts_a.dtype))
    return _tangent_kernel_op(acts_a, grads_a, acts_b, grads_b, code)
