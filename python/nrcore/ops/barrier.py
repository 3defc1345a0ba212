"""Barrier reductions for MLC-D and EBOMLC (docs/method-contract.md): one fused pass over whole gradient
lists instead of one kernel per tensor.

    stats = barrier_stats(grads_F_w, grads_Q_w, grads_Q_alpha)   # [4] float64, stays on device
    beta = barrier_coefficient(stats, delta)                      # 0-d float64, stays on device
    barrier_combine_(outs, grads_F_w, grads_Q_w, xi * beta)       # outs = F + coef * Q

Non-finite gradients do not raise in barrier_stats: EBOMLC skips such steps and counts them, so
the flag stats[3] says so (and barrier_coefficient returns 0 when it is set). barrier_combine_
raises (CPU) or records (CUDA, see check_errors) a non-finite output.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from nrcore.ops import _backend as B
from nrcore.ops import _validate as V
from nrcore.ops import reference

Tensor = torch.Tensor


def _ptrs(tensors: Sequence[Tensor]) -> List[int]:
    return [t.data_ptr() for t in tensors]


def _numels(tensors: Sequence[Tensor]) -> List[int]:
    return [t.numel() for t in tensors]


# ---------------------------------------------------------------------------------------------
# barrier_stats
# ---------------------------------------------------------------------------------------------


def _barrier_stats_impl(grads_f_w: List[Tensor], grads_q_w: List[Tensor], grads_q_alpha: List[Tensor]) -> Tensor:
    device = grads_q_w[0].device
    if not B.compiled_for(device):
        return reference.barrier_stats(grads_f_w, grads_q_w, grads_q_alpha)
    out = torch.empty(4, dtype=torch.float64, device=device)
    dev, stream = B.device_args(grads_q_w[0])
    B._C.barrier_stats(
        dev, stream, pair_dtype=B.DTYPE_CODES[grads_q_w[0].dtype], f=_ptrs(grads_f_w), q=_ptrs(grads_q_w),
        pair_numel=_numels(grads_q_w), alpha_dtype=B.DTYPE_CODES[grads_q_alpha[0].dtype], alpha=_ptrs(grads_q_alpha),
        alpha_numel=_numels(grads_q_alpha), out=out.data_ptr(), nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    return out


_barrier_stats_op = torch.library.custom_op("nrcore::barrier_stats", _barrier_stats_impl, mutates_args=())


@_barrier_stats_op.register_fake
def _(grads_f_w, grads_q_w, grads_q_alpha):
    return grads_q_w[0].new_empty(4, dtype=torch.float64)


def barrier_stats(grads_f_w: Sequence[Tensor], grads_q_w: Sequence[Tensor], grads_q_alpha: Sequence[Tensor]) -> Tensor:
    """[<gradF_w, gradQ_w>, |gradQ_w|^2, |gradQ_alpha|^2, flag] as a float64 [4] tensor on the
    gradients' device, in one fused pass over all three lists.

    grads_f_w and grads_q_w are parallel lists (same shapes and dtype per position, any shapes);
    grads_q_alpha is a list of any shapes. Accumulation is in float64 (products of float32 inputs
    are exact there; float64 inputs get compensated summation). flag = 1.0 when any input is
    non-finite (the sums are then meaningless), else 0.0. No host sync.
    """
    op = "barrier_stats"
    q = V.tensor_list(op, "grads_q_w", grads_q_w)
    f = V.tensor_list(op, "grads_f_w", grads_f_w, like=q, like_name="grads_q_w")
    a = V.tensor_list(op, "grads_q_alpha", grads_q_alpha)
    V.lists_on_one_device(op, [("grads_q_w", q), ("grads_f_w", f), ("grads_q_alpha", a)])
    return B.call(_barrier_stats_op, _barrier_stats_impl, f, q, a)


# ---------------------------------------------------------------------------------------------
# barrier_coefficient
# ---------------------------------------------------------------------------------------------


def _barrier_coefficient_impl(stats: Tensor, delta: float) -> Tensor:
    if not B.compiled_for(stats.device):
        return reference.barrier_coefficient(stats, delta)
    out = stats.new_empty(())
    dev, stream = B.device_args(stats)
    B._C.barrier_coefficient(dev, stream, stats.data_ptr(), delta, out.data_ptr())
    return out


_barrier_coefficient_op = torch.library.custom_op("nrcore::barrier_coefficient", _barrier_coefficient_impl, mutates_args=())


@_barrier_coefficient_op.register_fake
def _(stats, delta):
    return stats.new_empty(())


def barrier_coefficient(stats: Tensor, delta: float) -> Tensor:
    """max(delta - dot / (sq_w + sq_alpha), 0) from barrier_stats' output, as a 0-d float64 tensor
    on the same device (no host sync). 0 when sq_w + sq_alpha = 0 or the non-finite flag is set.
    MLC-D's beta = max((delta |gradQ|^2 - gradF.gradQ) / |gradQ|^2, 0) is the same number."""
    op = "barrier_coefficient"
    stats = V.tensor(op, "stats", stats, 1)
    if stats.shape[0] != 4:
        raise ValueError(f"{op}: stats must be barrier_stats' [4] tensor, got shape {tuple(stats.shape)}")
    if stats.dtype != torch.float64:
        if not stats.is_floating_point():
            raise TypeError(f"{op}: stats must be a float64 tensor, got {stats.dtype}")
        stats = stats.double()
    delta = V.number(op, "delta", delta)
    return B.call(_barrier_coefficient_op, _barrier_coefficient_impl, stats.contiguous(), delta)


# ---------------------------------------------------------------------------------------------
# barrier_combine_
# ---------------------------------------------------------------------------------------------


def _barrier_combine_impl(
    outs: List[Tensor],
    grads_f: List[Tensor],
    grads_q: List[Tensor],
    coef_tensor: Optional[Tensor],
    coef_value: float,
    skip_tensor: Optional[Tensor],
) -> None:
    op = "barrier_combine_"
    device = outs[0].device
    named = [("grads_f", grads_f), ("grads_q", grads_q), ("coef", coef_tensor)]
    if not B.compiled_for(device):
        if skip_tensor is not None and bool(skip_tensor != 0):
            return  # a skipped step: outs untouched (the twin path may sync; the compiled one never does)
        coef = coef_tensor if coef_tensor is not None else coef_value
        reference.barrier_combine_(outs, grads_f or None, grads_q, coef)
        if not all(bool(torch.isfinite(o).all()) for o in outs):
            raise B.OpError(B.first_nonfinite(op, named))
        return
    dev, stream = B.device_args(outs[0])
    coef_ptr = 0
    skip_ptr = skip_tensor.data_ptr() if skip_tensor is not None else 0
    if coef_tensor is not None:
        if dev >= 0:
            coef_ptr = coef_tensor.data_ptr()
        else:
            coef_value = float(coef_tensor)
    status = B._C.barrier_combine(
        dev, stream, dtype=B.DTYPE_CODES[outs[0].dtype], outs=_ptrs(outs), f=_ptrs(grads_f), q=_ptrs(grads_q),
        numel=_numels(outs), coef=coef_value, coef_ptr=coef_ptr, skip=skip_ptr, nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    if status:
        raise B.OpError(B.first_nonfinite(op, named))


_barrier_combine_op = torch.library.custom_op("nrcore::barrier_combine_", _barrier_combine_impl, mutates_args=("outs",))


@_barrier_combine_op.register_fake
def _(outs, grads_f, grads_q, coef_tensor, coef_value, skip_tensor):
    return None


def barrier_combine_(
    outs: Sequence[Tensor],
    grads_f: Optional[Sequence[Tensor]],
    grads_q: Sequence[Tensor],
    coef: Union[float, Tensor],
    *,
    skip_if: Optional[Tensor] = None,
) -> List[Tensor]:
    """In place, fused over the lists: outs[k] = grads_f[k] + coef * grads_q[k] (computed in
    float32 for half inputs); grads_f=None means outs[k] = coef * grads_q[k] (MLC-D's alpha step).

    outs may be grads_f itself (in-place update of .grad tensors). coef is a float or a 0-d
    tensor, e.g. `xi * barrier_coefficient(...)`, read on the device without a sync. A non-finite
    output raises ValueError on the CPU (outs then hold the partial result); on CUDA it is
    recorded for nrcore.ops.check_errors. Returns outs.

    skip_if: an optional one-element tensor on the outs' device (e.g. `~ok` of a step whose
    gradients are not finite); when nonzero the op writes nothing and reports nothing. It is read
    on the device, so a method can skip a bad step on CUDA without a host sync.
    """
    op = "barrier_combine_"
    o = V.tensor_list(op, "outs", outs)
    for i, t in enumerate(o):
        if t is not outs[i]:
            raise ValueError(f"{op}: outs[{i}] is not dense (strides {outs[i].stride()}); pass a contiguous tensor")
    q = V.tensor_list(op, "grads_q", grads_q, like=o, like_name="outs")
    f = V.tensor_list(op, "grads_f", grads_f, like=o, like_name="outs") if grads_f is not None else []
    V.lists_on_one_device(op, [("outs", o), ("grads_f", f), ("grads_q", q)])
    coef_tensor, coef_value = None, 0.0
    if isinstance(coef, torch.Tensor):
        if coef.numel() != 1 or not coef.is_floating_point():
            raise TypeError(f"{op}: coef must be a float or a one-element float tensor, got {coef.dtype} {tuple(coef.shape)}")
        if coef.device != o[0].device and coef.device.type != "cpu":
            raise ValueError(f"{op}: coef is on {coef.device} but outs are on {o[0].device}")
        if coef.device != o[0].device:
            coef_value = float(coef)  # a CPU scalar for CUDA outs: no device sync involved
        else:
            coef_tensor = coef.reshape(()).to(torch.float64)
    else:
        coef_value = V.number(op, "coef", coef)
    skip_tensor = None
    if skip_if is not None:
        if not isinstance(skip_if, torch.Tensor) or skip_if.numel() != 1:
            raise TypeError(f"{op}: skip_if must be a one-element tensor, got {type(skip_if).__name__}")
        if skip_if.device != o[0].device:
            raise ValueError(f"{op}: skip_if is on {skip_if.device} but outs are on {o[0].device}")
        skip_tensor = skip_if.reshape(()).to(torch.float64)
    B.call(_barrier_combine_op, _barrier_combine_impl, o, f, q, coef_tensor, coef_value, skip_tensor)
    return list(outs)
