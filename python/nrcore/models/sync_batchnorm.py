"""`--sync-bn`: BatchNorm whose training-mode statistics are those of the whole global batch
when a run's batch is cut across processes (torchrun; nrcore.parallel).

torch's `nn.SyncBatchNorm` runs on CUDA only and has neither forward-mode derivatives nor a
double backward, which the meta-reweighting hypergradients use (`jvp`, `autograd`); this one is
plain autograd over two sums across the ranks (`nrcore.parallel.sum_over_ranks`), so it runs on
every device and backend and under every derivative the methods take. The statistics are formed
in two passes (sum, then the sum of squared deviations), as accurate as BatchNorm's own; the
running variance is the unbiased variance of the whole batch. A batch every rank holds whole
(the trusted batch, inside `Ranks.whole_batch()`) and a single process take the same formula
without the sums over ranks, so a one-process `--sync-bn` run computes what the ranks compute
up to the order of additions. Eval mode is plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from nrcore.parallel import Ranks, sum_over_ranks


_ONE_PROCESS = Ranks()


class RankSyncBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d (N, C, H, W) or BatchNorm1d (N, C) layer normalising over every rank's slice."""

    def __init__(self, num_features: int, ranks: Ranks, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ranks = ranks

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"RankSyncBatchNorm: expected 2-d, 3-d or 4-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        across = self.ranks if self.ranks.slices_batches else _ONE_PROCESS
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        out_dtype = x.dtype
        x = x.float()  # statistics in float32 under autocast, as BatchNorm keeps them (a float16 count overflows at 65504)
        local_count = torch.full((1,), float(x.numel() // max(x.shape[1], 1)), dtype=x.dtype, device=x.device)  # no host copy
        sums = sum_over_ranks(torch.cat([x.sum(dims), local_count]), across)
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = sum_over_ranks(centred.square().sum(dims), across) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count.detach() / (count.detach() - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(out_dtype)


def convert_sync_batchnorm(model: nn.Module, ranks: Ranks) -> nn.Module:
    """`model` with every BatchNorm1d/2d layer replaced by a `RankSyncBatchNorm` holding the same
    parameters and buffers (the same object returned when it is itself one)."""
    if isinstance(model, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(model, RankSyncBatchNorm):
        layer = RankSyncBatchNorm(model.num_features, ranks, eps=model.eps, momentum=model.momentum, affine=model.affine,
                                  track_running_stats=model.track_running_stats)  # fmt: skip
        layer.load_state_dict(model.state_dict())
        layer.to(next(iter(model.state_dict().values())).device)
        layer.train(model.training)
        return layer
    for name, child in model.named_children():
        new = convert_sync_batchnorm(child, ranks)
        if new is not child:
            setattr(model, name, new)
    return model

