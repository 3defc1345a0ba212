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

from typing import List

import torch
import torch.nn.functional as F

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


def _tangent_dot_impl(acts: Tensor, grads: Tensor, direction: Tensor, strategy: int) -> Tensor:
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
        dev, stream, dtype=B.DTYPE_CODES[acts.dtype], batch=batch, T=T, p=p, q=q, k=k,
        acts=acts.data_ptr(), **_strides("acts", acts, "sb", "st", "sp"),
        grads=grads.data_ptr(), **_strides("grads", grads, "sb", "st", "sq"),
        direction=direction.data_ptr(), out=out.data_ptr(), strategy=strategy, nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _finish(op, status, named)
    return out


_tangent_dot_op = torch.library.custom_op("nrcore::tangent_dot", _tangent_dot_impl, mutates_args=())


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
        out = B.call(_tangent_dot_op, _tangent_dot_impl, acts, grads, D, code)
    return out[:, 0] if single else out


def _tangent_kernel_impl(acts_a: Tensor, grads_a: Tensor, acts_b: Tensor, grads_b: Tensor, strategy: int) -> Tensor:
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
        dev, stream, dtype=B.DTYPE_CODES[acts_a.dtype], batch_a=batch_a, T=T, batch_b=batch_b, S=S, p=p, q=q,
        acts_a=acts_a.data_ptr(), **_strides("acts_a", acts_a, "sb", "st", "sp"),
        grads_a=grads_a.data_ptr(), **_strides("grads_a", grads_a, "sb", "st", "sq"),
        acts_b=acts_b.data_ptr(), **_strides("acts_b", acts_b, "sb", "st", "sp"),
        grads_b=grads_b.data_ptr(), **_strides("grads_b", grads_b, "sb", "st", "sq"),
        out=out.data_ptr(), strategy=strategy, nthreads=B.num_threads(),
    )
    if dev >= 0:
        B.after_cuda_launch(dev)
    _finish(op, status, named)
    return out


_tangent_kernel_op = torch.library.custom_op("nrcore::tangent_kernel", _tangent_kernel_impl, mutates_args=())


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
    return B.call(_tangent_kernel_op, _tangent_kernel_impl, acts_a, grads_a, acts_b, grads_b, code)


# ---------------------------------------------------------------------------------------------
# Conv2d forms: acts = the layer's im2col patches, gathered inside the kernel
# ---------------------------------------------------------------------------------------------


def _pair(op: str, name: str, value) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = [value, value]
    else:
        pair = list(value) if isinstance(value, (list, tuple)) else []
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv_output_size(x_shape, kernel_size, stride, padding, dilation) -> List[int]:
    return [
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1) // stride[d] + 1 for d in range(2)
    ]


def unfold(x: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """Conv2d patches [B, Ho*Wo, C*kh*kw] (F.unfold's, transposed, same (c, i, j) order) by one
    strided copy: torch's CPU im2col is an order of magnitude slower."""
    (kh, kw), (Ho, Wo) = kernel_size, conv_output_size(x.shape, kernel_size, stride, padding, dilation)
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
    sb, sc, sh, sw = xp.stride()
    view = xp.as_strided(
        (x.shape[0], Ho, Wo, x.shape[1], kh, kw),
        (sb, sh * stride[0], sw * stride[1], sc, sh * dilation[0], sw * dilation[1]),
    )
    return view.reshape(x.shape[0], Ho * Wo, x.shape[1] * kh * kw)


def _strides(name: str, t: Tensor, *suffixes: str) -> dict:
    """{name_suffix: stride} for the binding's keywords, one suffix per dimension of `t`."""
    return {f"{name}_{suffix}": stride for suffix, stride in zip(suffixes, t.stride(), strict=True)}


def _conv_geometry(x: Tensor, kernel_size, stride, padding, dilation) -> dict:
    """A Conv2d input's ConvGeometry (nrcore/kernels.h) by field name."""
    Ho, Wo = conv_output_size(x.shape, kernel_size, stride, padding, dilation)
    sb, sc, sh, sw = x.stride()
    return dict(
        channels=x.shape[1], height=x.shape[2], width=x.shape[3], kh=kernel_size[0], kw=kernel_size[1],
        stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1],
        out_h=Ho, out_w=Wo, sb=sb, sc=sc, sh=sh, sw=sw,
    )


def _use_compiled_conv(device: torch.device, strategy: int, ghost: float, explicit: float) -> bool:
    """The in-kernel im2col path (CPU, explicit gradients) unless ghost is asked for or at least
    twice cheaper; otherwise patches are unfolded and the generic op decides."""
    if device.type != "cpu" or not B.compiled_for(device) or strategy == STRATEGIES["ghost"]:
        return False
    return strategy == STRATEGIES["explicit"] or not ghost * 2 < explicit


def _conv_tangent_dot_impl(
    x: Tensor, grads: Tensor, direction: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
    dilation: List[int], strategy: int,
) -> Tensor:
    batch, q, k = x.shape[0], grads.shape[1], direction.shape[0]
    T, p = grads.shape[2] * grads.shape[3], direction.shape[2]
    if not _use_compiled_conv(x.device, strategy, k * T * p * q, T * p * q + k * p * q):
        acts = unfold(x, kernel_size, stride, padding, dilation)
        return _tangent_dot_impl(acts, grads.flatten(2).transpose(1, 2), direction, strategy)
    g = grads.flatten(2)
    out = x.new_empty(batch, k, dtype=B.acc_dtype(x.dtype))
    direction_t = direction.transpose(1, 2).contiguous()  # [k, p, q]: G_i^T's layout
    status = B._C.conv_tangent_dot(
        dtype=B.DTYPE_CODES[x.dtype], batch=batch, q=q, k=k, x=x.data_ptr(), geom=_conv_geometry(x, kernel_size, stride, padding, dilation),
        grads=g.data_ptr(), **_strides("grads", g, "sb", "sq", "st"), direction_t=direction_t.data_ptr(), out=out.data_ptr(),
        nthreads=B.num_threads(),
    )
    _finish("conv_tangent_dot", status, [("x", x), ("grads", grads), ("direction", direction)])
    return out


_conv_tangent_dot_op = torch.library.custom_op("nrcore::conv_tangent_dot", _conv_tangent_dot_impl, mutates_args=())


@_conv_tangent_dot_op.register_fake
def _(x, grads, direction, kernel_size, stride, padding, dilation, strategy):
    return x.new_empty(x.shape[0], direction.shape[0], dtype=B.acc_dtype(x.dtype))


def _conv_tangent_kernel_impl(
    x_a: Tensor, grads_a: Tensor, x_b: Tensor, grads_b: Tensor, kernel_size: List[int], stride: List[int],
    padding: List[int], dilation: List[int], strategy: int,
) -> Tensor:
    Ba, Mb, q = x_a.shape[0], x_b.shape[0], grads_a.shape[1]
    T, S = grads_a.shape[2] * grads_a.shape[3], grads_b.shape[2] * grads_b.shape[3]
    p = x_a.shape[1] * kernel_size[0] * kernel_size[1]
    ghost, explicit = Ba * Mb * T * S * (p + q), (Ba * T + Mb * S) * p * q + Ba * Mb * p * q
    if not _use_compiled_conv(x_a.device, strategy, ghost, explicit):
        acts_a, acts_b = (unfold(x, kernel_size, stride, padding, dilation) for x in (x_a, x_b))
        return _tangent_kernel_impl(acts_a, grads_a.flatten(2).transpose(1, 2), acts_b, grads_b.flatten(2).transpose(1, 2), strategy)
    ga, gb = grads_a.flatten(2), grads_b.flatten(2)
    out = x_a.new_empty(Ba, Mb, dtype=B.acc_dtype(x_a.dtype))
    status = B._C.conv_tangent_kernel(
        dtype=B.DTYPE_CODES[x_a.dtype], batch_a=Ba, batch_b=Mb, q=q,
        x_a=x_a.data_ptr(), geom_a=_conv_geometry(x_a, kernel_size, stride, padding, dilation),
        grads_a=ga.data_ptr(), **_strides("grads_a", ga, "sb", "sq", "st"),
        x_b=x_b.data_ptr(), geom_b=_conv_geometry(x_b, kernel_size, stride, padding, dilation),
        grads_b=gb.data_ptr(), **_strides("grads_b", gb, "sb", "sq", "st"), out=out.data_ptr(), nthreads=B.num_threads(),
    )
    _finish("conv_tangent_kernel", status, [("x_a", x_a), ("grads_a", grads_a), ("x_b", x_b), ("grads_b", grads_b)])
    return out


_conv_tangent_kernel_op = torch.library.custom_op("nrcore::conv_tangent_kernel", _conv_tangent_kernel_impl, mutates_args=())


@_conv_tangent_kernel_op.register_fake
def _(x_a, grads_a, x_b, grads_b, kernel_size, stride, padding, dilation, strategy):
    return x_a.new_empty(x_a.shape[0], x_b.shape[0], dtype=B.acc_dtype(x_a.dtype))


def _check_conv(op: str, suffix: str, x, grads, geometry):
    x = V.floating(op, "x" + suffix, x, 4)
    grads = V.floating(op, "grads" + suffix, grads, 4)
    V.same_dtype(op, "x" + suffix, x, **{"grads" + suffix: grads})
    out_hw = conv_output_size(x.shape, *geometry)
    if grads.shape[0] != x.shape[0] or list(grads.shape[2:]) != out_hw:
        raise ValueError(
            f"{op}: grads{suffix} has shape {tuple(grads.shape)} but the convolution of x{suffix} {tuple(x.shape)} "
            f"gives [{x.shape[0]}, q, {out_hw[0]}, {out_hw[1]}]"
        )
    return x, grads


def _geometry_args(op: str, kernel_size, stride, padding, dilation):
    geometry = [_pair(op, n, v) for n, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding), ("dilation", dilation))]
    if min(geometry[0] + geometry[1] + geometry[3]) < 1 or min(geometry[2]) < 0:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be >= 1 and padding >= 0, got {geometry}")
    return geometry


def conv_tangent_dot(
    x: Tensor, grads: Tensor, direction: Tensor, *, kernel_size, stride=1, padding=0, dilation=1, strategy: str = "auto"
) -> Tensor:
    """tangent_dot for a Conv2d layer (groups=1, zero padding) without materialising its patches.

    x [B, C, H, W] the layer's input, grads [B, q, Ho, Wo] the gradient of its output, direction
    shaped like the weight [q, C, kh, kw] (or [q, C*kh*kw]) -> [B], or k of them
    [k, q, C, kh, kw] -> [B, k]. Equals tangent_dot(unfold(x), grads.flatten(2).transpose(1, 2),
    direction): on the CPU the patches are gathered per example inside the kernel; on CUDA, or
    when the ghost form is at least twice cheaper, they are unfolded first.
    """
    op = "conv_tangent_dot"
    geometry = _geometry_args(op, kernel_size, stride, padding, dilation)
    x, grads = _check_conv(op, "", x, grads, geometry)
    direction = V.floating(op, "direction", direction)
    V.same_dtype(op, "x", x, direction=direction)
    q, p = grads.shape[1], x.shape[1] * geometry[0][0] * geometry[0][1]
    single = direction.dim() in (2, 4)
    D = direction[None] if single else direction
    if D.dim() not in (3, 5) or D.shape[1] != q or D[0, 0].numel() != p:
        raise ValueError(f"{op}: direction must be shaped like the weight [{q}, {x.shape[1]}, {geometry[0][0]}, {geometry[0][1]}] "
                         f"(or [k, ...] of them), got {tuple(direction.shape)}")
    V.same_device(op, x=x, grads=grads, direction=direction)
    code = _strategy(op, strategy)
    D = D.reshape(D.shape[0], q, p).contiguous()
    if x.shape[0] == 0 or D.shape[0] == 0:
        out = x.new_zeros(x.shape[0], D.shape[0], dtype=B.acc_dtype(x.dtype))
    else:
        out = B.call(_conv_tangent_dot_op, _conv_tangent_dot_impl, x, grads, D, *geometry, code)
    return out[:, 0] if single else out


def conv_tangent_kernel(
    x_a: Tensor, grads_a: Tensor, x_b: Tensor, grads_b: Tensor, *, kernel_size, stride=1, padding=0, dilation=1,
    strategy: str = "auto",
) -> Tensor:
    """tangent_kernel for a Conv2d layer: K_ij = <G_i, G'_j> between two batches (inputs x_a, x_b
    [*, C, H, W], output gradients grads_a, grads_b [*, q, Ho, Wo]) -> [B, M], without
    materialising the patches (see conv_tangent_dot)."""
    op = "conv_tangent_kernel"
    geometry = _geometry_args(op, kernel_size, stride, padding, dilation)
    x_a, grads_a = _check_conv(op, "_a", x_a, grads_a, geometry)
    x_b, grads_b = _check_conv(op, "_b", x_b, grads_b, geometry)
    V.same_dtype(op, "x_a", x_a, x_b=x_b)
    if x_a.shape[1] != x_b.shape[1] or grads_a.shape[1] != grads_b.shape[1]:
        raise ValueError(f"{op}: the two batches must come from the same layer: channels {x_a.shape[1]}/{x_b.shape[1]}, "
                         f"output channels {grads_a.shape[1]}/{grads_b.shape[1]}")
    V.same_device(op, x_a=x_a, grads_a=grads_a, x_b=x_b, grads_b=grads_b)
    code = _strategy(op, strategy)
    if x_a.shape[0] == 0 or x_b.shape[0] == 0:
        return x_a.new_zeros(x_a.shape[0], x_b.shape[0], dtype=B.acc_dtype(x_a.dtype))
    return B.call(_conv_tangent_kernel_op, _conv_tangent_kernel_impl, x_a, grads_a, x_b, grads_b, *geometry, code)
