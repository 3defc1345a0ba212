"""Several processes training one model (`torchrun ... -m nrcore train`): what the trainer, the
methods and the models need to know about the other ranks. Below every other layer.

A run under `torchrun --nproc-per-node N` is the single-process run with each global batch cut in
N consecutive slices, one per rank (`slice_bounds`). Every rank draws the same epoch order and
augmentation (both seeded by (seed, epoch)), holds the same parameters and per-example state,
and sees the same trusted batches; a step's gradients are combined so that each rank ends the
step where one process with the whole batch would. The rules, for a method's step:

* A loss that is a mean over this rank's slice (`(1/b) Σ_{i in slice} l_i`) is the slice's part
  of the global mean once scaled by `share = b / B`; the gradients of the scaled losses sum over
  the ranks to the gradient of the global mean (`grad`, `backward_and_step` in nrcore.methods).
  Scaling the loss rather than the gradient keeps this exact through batch statistics shared
  across ranks (`--sync-bn`), whatever the slice sizes.
* A loss on the trusted batch is the same on every rank, and so is its gradient: not reduced.
* Per-example tensors a step writes at its slice's rows are gathered after every step
  (`gather_rows_`), so that every rank holds every row.

Single process (`Ranks()`): rank 0 of 1, every collective the identity, `share` 1. A collective
that fails because another rank died raises `RankLostError` (one line, what to do), bounded by
the process group's timeout (`--dist-timeout`) where the backend does not notice sooner.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

DEFAULT_TIMEOUT_S = 600


class RankLostError(RuntimeError):
    """A collective failed: another rank of the run died or stopped answering."""


class Ranks:
    """The processes of one run, as a method or the trainer sees them."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None, *, owns_group: bool = False):
        self.rank, self.world_size = int(rank), int(world_size)
        self.owns_group = owns_group  # `start` joined the process group, so `stop` leaves it
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.share = 1.0  # this rank's part of the current global batch; set by `begin_step`
        self._slice: Optional[Tuple[int, int, int]] = None  # (lo, hi, total) of the current step
        self._whole = 0  # > 0 inside `whole_batch()`

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    # ---- slices of a global batch ---------------------------------------------------------------
    def slice_bounds(self, total: int) -> Tuple[int, int]:
        """[lo, hi) of this rank's slice of a global batch of `total` examples: consecutive
        slices as equal as possible, the first `total % N` ranks one longer."""
        base, extra = divmod(int(total), self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    @contextlib.contextmanager
    def whole_batch(self):
        """Forwards inside see a batch that every rank holds whole (the trusted batch): layers
        that combine statistics across ranks (`--sync-bn`) keep them local, which is already the
        whole batch's."""
        self._whole += 1
        try:
            yield
        finally:
            self._whole -= 1

    @property
    def slices_batches(self) -> bool:
        """True when the batch now being forwarded is cut across ranks (distributed, outside
        `whole_batch()`)."""
        return self.distributed and not self._whole

    def begin_step(self, batch) -> None:
        """The trainer's call before a training step on `batch` (this rank's slice)."""
        total = batch.total
        self.share = len(batch) / total if total else 0.0
        lo = batch.offset
        self._slice = (lo, lo + len(batch), total)

    # ---- collectives ----------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        except RuntimeError as exc:  # gloo: a closed connection; NCCL: the watchdog's timeout
            raise RankLostError(
                f"rank {self.rank}: lost the other ranks during a collective ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                "the last checkpoint is intact: continue with --resume"
            ) from exc

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place: one collective per dtype (the tensors are
        packed into one flat buffer)."""
        if not self.distributed or not tensors:
            return
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._all_reduce(flat)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (a detached copy; `tensor` itself for one process)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        self.sum_([out])
        return out

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the ranks (a detached copy; `tensor` for one process)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        self._all_reduce(out, "max")
        return out

    def scale_local(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` (a mean over this rank's slice) as its part of the global batch's mean."""
        return loss * self.share if self.distributed else loss

    def grad(self, loss: torch.Tensor, inputs: Sequence[torch.Tensor], *, local_mean: bool = True, **kwargs) -> Tuple[torch.Tensor, ...]:
        """`torch.autograd.grad` of the global batch's loss whose part on this rank is `loss`: a
        mean over the slice (`local_mean`, scaled by `share`) or already a part of a global sum
        (`local_mean=False`); the gradients are summed over the ranks. Unused inputs get zeros.
        Not differentiable across ranks (no `create_graph` through the sum)."""
        scaled = self.scale_local(loss) if local_mean else loss
        grads = torch.autograd.grad(scaled, list(inputs), allow_unused=True, **kwargs)
        grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))
        if self.distributed:
            if kwargs.get("create_graph"):
                raise NotImplementedError("Ranks.grad: create_graph through the sum over ranks")
            self.sum_([g for g in grads])
        return grads

    def sum_grads_(self, params: Iterable[torch.Tensor]) -> None:
        """Sum `.grad` of `params` over the ranks. Every rank runs the same code, so a parameter
        without a gradient has none on any rank: it is left without one (an optimiser skips it,
        as it would in one process)."""
        if not self.distributed:
            return
        self.sum_([p.grad for p in params if p.grad is not None])

    def gather_rows_(self, tensors: Iterable[torch.Tensor], index: torch.Tensor) -> None:
        """After a step: rows `index` (this rank's slice) of each per-example tensor were written
        here and the other slices' rows elsewhere; afterwards every rank holds all of them. Each
        rank puts its rows in a zeroed buffer of the whole batch, the buffers are summed, and the
        whole batch's rows are written back."""
        if not self.distributed:
            return
        if self._slice is None:
            raise RuntimeError("Ranks.gather_rows_ before begin_step")
        lo, hi, total = self._slice
        whole = torch.empty(total, dtype=index.dtype, device=index.device)
        whole.zero_()
        whole[lo:hi] = index
        tensors = list(tensors)
        buffers = []
        for t in tensors:
            dtype = torch.uint8 if t.dtype == torch.bool else t.dtype  # no sum of bools in the backends
            buf = torch.zeros((total,) + tuple(t.shape[1:]), dtype=dtype, device=t.device)
            buf[lo:hi] = t[index]
            buffers.append(buf)
        self.sum_([whole] + buffers)
        for t, buf in zip(tensors, buffers):
            t[whole] = buf.to(t.dtype)

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place."""
        if not self.distributed or not tensors:
            return
        self.sum_(list(tensors))
        torch._foreach_div_(list(tensors), float(self.world_size))

    def agree_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Make values that every rank computed from the same inputs (the trusted batch's
        gradients) bitwise equal on all ranks by averaging them. Needed on GPUs, whose kernels may
        add in a different order on each rank; the CPU's are deterministic, so there it is free."""
        if self.device.type != "cpu":
            self.average_(tensors)

    def check_same(self, tensors: Dict[str, torch.Tensor], what: str) -> None:
        """Raise if the ranks hold different values: a fingerprint (each tensor's sum and sum of
        squares, in float64) compared across them. What a step combines across ranks is
        identical by construction; this catches a step that forgot to (a bug, not bad input)."""
        if not self.distributed or not tensors:
            return
        names = list(tensors)
        values = [t.detach().to(self.device, torch.float64) for t in tensors.values()]  # Adam's step counts live on the CPU
        prints = torch.stack([torch.stack([v.sum(), v.square().sum()]) for v in values])
        high, low = self.max(prints), -self.max(-prints)
        spread = ((high - low).abs() / high.abs().clamp_min(1e-30)).amax(dim=1)
        if bool((spread > 1e-6).any()):  # a forgotten combination differs by far more than rounding
            worst = int(spread.argmax())
            raise RuntimeError(f"rank {self.rank}: the processes hold different {what}: {names[worst]} (relative spread "
                               f"{float(spread[worst]):.2e}); a method's step does not combine its updates across processes")

    def barrier(self) -> None:
        """Wait (on the host) until every rank gets here: an all-reduce read back, which fails
        like the other collectives when a rank is gone."""
        if self.distributed:
            self.sum(torch.zeros(1, device=self.device)).item()


class _SumOverRanks(torch.autograd.Function):
    """`Σ_r x_r` over the ranks, differentiable in both modes: every rank's loss depends on the
    sum (e.g. global batch statistics), so the gradient of the total loss with respect to each
    rank's `x_r` is the sum over ranks of the incoming gradients, and a tangent likewise."""

    @staticmethod
    def forward(x, ranks):
        out = x.clone()
        ranks._all_reduce(out)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.ranks = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad.contiguous(), ctx.ranks), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _SumOverRanks.apply(tangent.contiguous(), ctx.ranks)


def sum_over_ranks(x: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`x` summed over the ranks, with gradients (and forward-mode tangents) that flow back to
    every rank; the identity for one process."""
    return _SumOverRanks.apply(x, ranks) if ranks.distributed else x


# ---- starting and ending -------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (torchrun's WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tuple[Ranks, torch.device]:
    """Join the process group that torchrun's environment describes (gloo on the CPU, NCCL on
    CUDA, each rank on GPU LOCAL_RANK) and return (ranks, this rank's device). Without such an
    environment: `Ranks()` and `device` unchanged."""
    if not launched_by_torchrun():
        return Ranks(device=device), device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)),
                                **({"device_id": device} if backend == "nccl" else {}))  # fmt: skip
        _stop_on_sigterm(rank)
        import faulthandler

        faulthandler.enable()  # a rank killed by a fatal signal (a C++ abort) prints its Python stack
    return Ranks(rank, world, device, owns_group=owns), device


def stop(ranks: Ranks, *, finished: bool = True) -> None:
    """Leave the process group if `start` joined it. After a finished run the ranks wait for
    each other first (gloo aborts a process whose peer tore the group down before it); after an
    error they do not, since the others may be inside some other collective."""
    import torch.distributed as dist

    if ranks.owns_group and dist.is_initialized():
        if finished:
            try:
                ranks.barrier()
            except RankLostError:
                pass  # a peer is gone already: nothing to wait for
        dist.destroy_process_group()
        ranks.owns_group = False


def end_process(code: int) -> None:
    """End this process now with `code`, skipping the interpreter's teardown: for a torchrun
    rank whose process group is already left. Under load, ranks sometimes aborted in that
    teardown after a finished run ("terminate called without an active exception", with no
    Python frame on the stack: a C++ thread of torch's destroyed while still joinable), which
    torchrun reports as a failed run. By then every file the run writes is complete (atomic
    writes, closed), so flushing stdio is all the teardown would have done for us."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_on_sigterm(rank: int) -> None:
    """torchrun ends the other ranks with SIGTERM when one fails: turn that into an error that
    says so (the trainer records it and the last checkpoint stays as it was)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise RankLostError(f"rank {rank}: stopped by the launcher (SIGTERM): another rank failed or the run was cancelled; "
                            "the last checkpoint is intact: continue with --resume")

    signal.signal(signal.SIGTERM, handler)
