"""No method's training step synchronises the host with the device: on the CPU, every registered
method's steps run inside `no_host_sync()` (which fails on `.item()`, `bool(t)`, `nonzero`,
boolean indexing, ...); on a GPU, inside `torch.cuda.set_sync_debug_mode("error")`."""

import contextlib

import pytest
import torch

from nrcore.methods import registry
from nrcore.train.sync_guard import HostSyncError, no_host_sync

# every method with its defaults, in both phases of the phased ones, and the other hypergradient paths
CASES = [(name, {}, "last") for name in sorted(registry())] + [
    ("glc", {}, "first"), ("forward", {}, "first"), ("meta", {"hypergrad": "tangent"}, "last"),
    ("meta", {"hypergrad": "autograd"}, "last"), ("coteaching-plus", {"init_epoch": 0, "full_batch_steps": 0}, "last"),
]  # fmt: skip
IDS = [f"{n}{''.join(f':{k}={v}' for k, v in o.items())}@{p}" for n, o, p in CASES]


@pytest.mark.parametrize("method_name,options,phase", CASES, ids=IDS)
def test_steps_do_not_sync_on_the_cpu_guard(digits_task, run_steps, method_name, options, phase):
    # one step first: lazy set-up (optimiser state, ...) is allowed to read values once
    # host_reads_free=False: the path an accelerator takes (a CPU may read values for free)
    losses, _ = run_steps(digits_task, method_name, options, steps=2, warmup=1, around_step=no_host_sync, phase=phase,
                          host_reads_free=False)
    assert torch.isfinite(losses).all()


def test_the_guard_fails_on_what_would_sync():
    x = torch.randn(8)
    for sync in (lambda: x.sum().item(), lambda: bool(x.max() > 0), lambda: x[x > 0], lambda: x.nonzero(), lambda: int(x.argmax())):
        with pytest.raises(HostSyncError):
            with no_host_sync():
                sync()
    with no_host_sync():  # the sync-free spellings pass
        torch.where(x > 0, x, torch.zeros_like(x)).sum()
        x[torch.tensor([1, 3])] * (x > 0).float().mean()


@contextlib.contextmanager
def cuda_sync_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method_name,options,phase", CASES, ids=IDS)
def test_steps_do_not_sync_on_cuda(digits_task, run_steps, method_name, options, phase):
    losses, _ = run_steps(digits_task, method_name, options, steps=2, warmup=1, around_step=cuda_sync_errors, phase=phase, device="cuda")
    assert torch.isfinite(losses).all()
