"""Argument checks shared by the public ops. They look only at types, shapes, dtypes and devices
(never at values), so they cost no host-device sync and trace cleanly under torch.compile.
Every message starts with the op and names the offending argument."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from nrcore.ops._backend import CPU_DTYPES, CUDA_DTYPES

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tensor(op: str, name: str, t, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def floating(op: str, name: str, t, ndim: Optional[int] = None, *, widen_half: bool = True) -> torch.Tensor:
    """A float tensor of a dtype the kernels support on its device, for an input the op only
    reads. Half-precision inputs on the CPU (what autocast gives) come back as float32 unless
    `widen_half` is False: the CPU kernels compute in float32 or float64, so nothing is lost over
    accumulating in float32."""
    t = tensor(op, name, t, ndim)
    if widen_half and t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    allowed = CUDA_DTYPES if t.device.type == "cuda" else CPU_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must have dtype {names} on {t.device.type}, got {t.dtype}")
    return t


def index(op: str, name: str, t, length: Optional[int] = None) -> torch.Tensor:
    """A 1-D integer tensor, returned as int64."""
    t = tensor(op, name, t, 1)
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{op}: {name} must have length {length}, got {t.shape[0]}")
    return t if t.dtype == torch.int64 else t.long()


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: all tensors must be on one device; {first_name} is on {first.device} but {name} is on {t.device}")
    return first.device


def number(op: str, name: str, value) -> float:
    """A finite real number (bools and tensors are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def tensor_list(op: str, name: str, value, like: Optional[List[torch.Tensor]] = None, like_name: str = "") -> List[torch.Tensor]:
    """A non-empty list/tuple of float tensors of one supported dtype on one device, each dense in
    memory (non-dense ones are copied). With `like` (a list already checked), a parallel list:
    same length, shape, dtype and device per position, and copied into `like`'s memory layout where
    it differs, so the two can be walked as flat arrays side by side. One pass: gradient lists hold
    hundreds of tensors and this runs every step."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{op}: {name} is empty")
    if like is not None and len(value) != len(like):
        raise ValueError(f"{op}: {name} has {len(value)} tensors but {like_name} has {len(like)}; the lists must be parallel")
    # gradient lists (the barrier ops) come from float32 master weights: a half list on the CPU
    # is refused by dtype rather than copied whole every step
    first = floating(op, f"{name}[0]", value[0], widen_half=False)
    dtype, device = first.dtype, first.device
    if like is not None and dtype != like[0].dtype:
        raise TypeError(f"{op}: {name} has dtype {dtype} but {like_name} has {like[0].dtype}; they must match")
    out = list(value)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype is not dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype} but {name}[0] has {dtype}; one dtype per list")
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device; {name}[0] is on {device} but {name}[{i}] is on {t.device}")
        if like is not None:
            ref = like[i]
            if t.shape != ref.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)} but {like_name}[{i}] has {tuple(ref.shape)}")
            if t.stride() != ref.stride():
                out[i] = torch.empty_like(ref).copy_(t)
        elif not t.is_contiguous() and not is_dense(t):
            out[i] = t.contiguous()
    return out


def lists_on_one_device(op: str, lists: Sequence[tuple]) -> None:
    """(name, checked list) pairs: the lists' first tensors share a device."""
    name0, first = lists[0]
    for name, tensors in lists[1:]:
        if tensors and tensors[0].device != first[0].device:
            raise ValueError(f"{op}: all tensors must be on one device; {name0}[0] is on {first[0].device} but {name}[0] is on {tensors[0].device}")


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping, dense storage with positive strides: the elements are exactly the
    block [data_ptr, data_ptr + numel) in some order (contiguous, channels_last, permuted...)."""
    if t.is_contiguous():
        return True
    expected = 1
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True
