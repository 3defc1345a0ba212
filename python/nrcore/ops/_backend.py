"""Loading the compiled core and the plumbing shared by the op modules.

`nrcore._C` is optional: without it every op runs its pure-PyTorch twin (nrcore.ops.reference)
after a one-time warning, unless the environment sets NRCORE_REQUIRE_COMPILED=1 (CI does), in
which case a missing compiled module, or missing CUDA kernels for a CUDA tensor, is an error.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

_REQUIRE_COMPILED = os.environ.get("NRCORE_REQUIRE_COMPILED", "").strip() not in ("", "0")
# Debugging aid: check the CUDA error word after every CUDA op (synchronises).
_SYNC_CHECKS = os.environ.get("NRCORE_SYNC_CHECKS", "").strip() not in ("", "0")

try:
    from nrcore import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc
    if _REQUIRE_COMPILED:
        raise ImportError(
            "NRCORE_REQUIRE_COMPILED=1 but the compiled module nrcore._C could not be imported "
            f"({exc}); rebuild with `pip install --no-build-isolation -e .`"
        ) from exc

# dtype codes understood by the kernels (cpp/common.h)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# status bits returned by CPU kernels / collected by CUDA kernels (cpp/common.h)
BAD_INDEX, NON_FINITE, DUPLICATE_INDEX = 1, 2, 4
# op ids for the CUDA error word (cuda/common.cuh)
OP_IDS = {
    "fbr_prepare": 0,
    "fbr_direction": 1,
    "fbr_update_": 2,
    "tangent_dot": 4,
    "tangent_kernel": 5,
    "barrier_stats": 6,
    "barrier_combine_": 7,
}

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def compiled_for(device: torch.device) -> bool:
    """Whether compiled kernels serve tensors on `device` (warns once, or raises under
    NRCORE_REQUIRE_COMPILED=1, when they do not)."""
    if _C is None:
        _warn_once("missing", f"nrcore._C is not available ({_IMPORT_ERROR}); nrcore.ops uses the pure-PyTorch reference ops")
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if _C.has_cuda:
            return True
        if _REQUIRE_COMPILED:
            raise RuntimeError("NRCORE_REQUIRE_COMPILED=1 but nrcore._C was built without CUDA kernels")
        _warn_once("nocuda", "nrcore._C was built without CUDA kernels; CUDA tensors use the pure-PyTorch reference ops")
        return False
    _warn_once(f"dev-{device.type}", f"nrcore.ops has no compiled kernels for {device.type}; using the reference ops")
    return False


def backend(device: "str | torch.device" = "cpu") -> str:
    """'compiled' when nrcore's compiled kernels run the ops for tensors on `device`,
    'reference' when the pure-PyTorch twins in nrcore.ops.reference do."""
    device = torch.device(device)
    if _C is None:
        return "reference"
    if device.type == "cpu" or (device.type == "cuda" and _C.has_cuda):
        return "compiled"
    return "reference"


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def call(op, impl, *args):
    """Run a registered op. In plain eager mode go straight to its implementation: the custom-op
    dispatcher costs 20-35 us per call, more than a small kernel. Under torch.compile, with a
    dispatch or function mode active (FakeTensorMode, ...) or with tensor subclasses, go through
    the registered op (torch.ops.nrcore.*) so tracing and fake kernels work."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return op(*args)
    for a in args:
        first = a[0] if isinstance(a, list) and a else a
        if isinstance(first, torch.Tensor) and type(first) not in _PLAIN_TENSORS:
            return op(*args)
    return impl(*args)


def device_args(t: torch.Tensor):
    """(device index, stream handle) for the binding: (-1, 0) on the CPU, else the tensor's CUDA
    device and its current stream (kernels launch there, asynchronously)."""
    if t.device.type == "cpu":
        return -1, 0
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def num_threads() -> int:
    return torch.get_num_threads()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and output) dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class OpError(ValueError):
    """A data-dependent problem a kernel found (bad label, non-finite value)."""


def after_cuda_launch(device_index: int) -> None:
    if _SYNC_CHECKS:
        check_errors(torch.device("cuda", device_index))


def check_errors(device: "str | torch.device | None" = None) -> None:
    """Raise the problems that CUDA kernels recorded since the last check.

    CUDA kernels never synchronise with the host to report bad data (labels out of range,
    non-finite outputs); they set bits in a per-device error word instead and leave the bad
    entries out of any state they update in place. Call this where a sync is cheap (the end of an
    epoch, a logging step), or set NRCORE_SYNC_CHECKS=1 to check after every op while debugging.
    CPU ops raise immediately and need no check. `device=None` checks every CUDA device.
    """
    if _C is None or not getattr(_C, "has_cuda", False) or not torch.cuda.is_available():
        return
    devices = range(torch.cuda.device_count()) if device is None else [torch.device(device).index or 0]
    for index in devices:
        word = int(_C.cuda_take_errors(index))
        status, ops = word & 0xFF, word >> 8
        if status:
            names = [name for name, bit in OP_IDS.items() if ops >> bit & 1] or ["(unknown)"]
            raise OpError(f"nrcore CUDA op(s) {', '.join(names)} on cuda:{index} reported: {describe_status(status)}")


def describe_status(status: int) -> str:
    parts = []
    if status & BAD_INDEX:
        parts.append("a label or index outside its valid range")
    if status & NON_FINITE:
        parts.append("non-finite values")
    if status & DUPLICATE_INDEX:
        parts.append("duplicate indices")
    return "; ".join(parts) or f"status {status}"


def first_nonfinite(op: str, named: Sequence[tuple]) -> str:
    """Error text naming the first argument among (name, tensor-or-list) that holds a non-finite
    value (only evaluated on the error path)."""
    for name, value in named:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                return f"{op}: {where} contains non-finite values (NaN or inf)"
    return f"{op}: the result is not finite (an overflow; inputs are finite)"
