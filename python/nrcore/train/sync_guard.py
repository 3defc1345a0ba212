"""`no_host_sync()`: a guard that fails the moment code reads a tensor's value on the host, or
asks for an output whose size depends on the data, the operations that would wait for the GPU
(a host-device synchronisation) if the tensors were on CUDA. It works on CPU tensors, so a
method's step can be checked for syncs without a GPU:

    with no_host_sync():
        method.train_step(batch, clean)     # HostSyncError on .item(), bool(t), float(t), nonzero(), x[mask], ...

On a GPU, `torch.cuda.set_sync_debug_mode("error")` checks the real thing (see tests); this
guard sees the same calls through the dispatcher: `aten::_local_scalar_dense` (what `.item()`,
`bool()`, `int()`, `float()` of a tensor run), `nonzero`, `masked_select`, `unique`, boolean
indexing and `repeat_interleave` without an output size.

Inside `torch.optim.Optimizer.step` the guard pauses: torch's optimizers keep their step
counters on the host unless built `capturable`, and read them there (Adam's bias correction),
which costs no device sync on a GPU run either.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {
    "_local_scalar_dense": "reads a tensor's value on the host (.item(), bool(t), float(t), int(t), `if t:`)",
    "nonzero": "nonzero(): its output size depends on the data",
    "masked_select": "masked_select: its output size depends on the data",
    "_unique2": "unique(): its output size depends on the data",
    "unique_dim": "unique(): its output size depends on the data",
    "unique_consecutive": "unique_consecutive(): its output size depends on the data",
}


class HostSyncError(RuntimeError):
    """Code inside `no_host_sync()` did something that synchronises the host with the device."""


class no_host_sync(TorchDispatchMode):
    """Raise HostSyncError on operations that would synchronise with a CUDA device."""

    def __enter__(self):
        self._in_optimizer_step = 0
        from torch.optim import optimizer as hooks
        self._hooks = [hooks.register_optimizer_step_pre_hook(self._pause), hooks.register_optimizer_step_post_hook(self._resume)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _pause(self, *args):
        self._in_optimizer_step += 1

    def _resume(self, *args):
        self._in_optimizer_step -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_optimizer_step:
            return func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in _SYNCING:
            raise HostSyncError(f"host-device sync inside no_host_sync(): {_SYNCING[name]} ({func})")
        if name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            raise HostSyncError(f"host-device sync inside no_host_sync(): indexing with a boolean mask ({func}); use torch.where or a multiplication")
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) >= 2 and isinstance(args[1], torch.Tensor):
            raise HostSyncError(f"host-device sync inside no_host_sync(): repeat_interleave without output_size ({func})")
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)
