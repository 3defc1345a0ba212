"""Small-loss selection between two networks, shared by `coteaching`, `coteaching-plus` and
`jocor` (not a method itself: nothing in families/ is registered): the forget-rate schedule, the
selection rule and `TwoNetworkSelection`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from nrcore.methods.base import ExampleSignal, Method, StepOutput, masked_mean

# ---- small-loss selection between two networks ---------------------------------------------


def forget_rate_at(epoch: int, forget_rate: float, num_gradual: int, exponent: float = 1.0) -> float:
    """Co-teaching's schedule: the fraction of each batch dropped during `epoch` (0-based).

    Han et al. (2018), Alg. 1: `R(T) = 1 - tau * min(T / T_k, 1)` is the fraction kept in epoch
    T+1 after T finished epochs, so the first epoch keeps everything and the full rate tau is
    reached after `T_k = num_gradual` epochs. `exponent` c bends the ramp, `T^c / T_k`, for
    studies of its shape (the paper varies c in {0.5, 1, 2}); c = 1 is the paper's main setting. The authors' code uses `linspace(0, tau, T_k)`, which reaches tau one epoch earlier."""
    if num_gradual <= 0:
        return forget_rate
    return forget_rate * min(epoch**exponent / num_gradual, 1.0)


def small_loss_mask(losses: torch.Tensor, keep_fraction: float, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B]: the `ceil(keep_fraction * n)` smallest `losses` among the `n` candidates.

    "Small loss" is the selection of Co-teaching (all examples are candidates) and Co-teaching+
    (the candidates are the examples the two networks disagree on); `|D'| >= R |D|` in the
    papers, hence the ceiling. Runs on the device without a host sync: the count is a tensor."""
    if candidates is None:
        candidates = torch.ones_like(losses, dtype=torch.bool)
    n = candidates.sum()
    keep = torch.ceil(keep_fraction * n.double() - 1e-6)  # -1e-6: (1 - 0.8) * 100 must keep 20, not 21
    ranked = torch.where(candidates, losses.detach(), torch.full_like(losses, math.inf))
    order = torch.argsort(ranked, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank < keep


def cross_update_losses(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    labels: torch.Tensor,
    keep_fraction: float,
    candidates: Optional[torch.Tensor] = None,
    select_all: Optional[torch.Tensor] = None,
):
    """The cross update of Co-teaching: each network picks its small-loss examples and its
    peer learns from them. Returns (loss of network 1, loss of network 2, mask picked by
    network 1, mask picked by network 2); both losses are per-example cross-entropies of the
    logits averaged once over the peer's selection. `select_all`, a 0-d bool tensor: where
    true, both networks pick the whole batch (Co-teaching+'s fallback; a tensor, so no sync)."""
    ce1 = F.cross_entropy(logits1, labels, reduction="none")
    ce2 = F.cross_entropy(logits2, labels, reduction="none")
    picked1 = small_loss_mask(ce1, keep_fraction, candidates)
    picked2 = small_loss_mask(ce2, keep_fraction, candidates)
    if select_all is not None:
        picked1, picked2 = picked1 | select_all, picked2 | select_all
    return masked_mean(ce1, picked2), masked_mean(ce2, picked1), picked1, picked2


def default_forget_rate(task) -> float:
    """The nominal noise rate of the task (Co-teaching assumes it known: tau = epsilon). For real
    label sets without a nominal rate, the off-diagonal mass of the task's transition matrix."""
    if task.noise_rate_nominal is not None:
        return float(task.noise_rate_nominal)
    if task.transition_matrix is not None:
        return float(1.0 - torch.diagonal(task.transition_matrix.double()).mean())
    raise ValueError("this task has no nominal noise rate: pass --forget-rate")


class TwoNetworkSelection(Method):
    """Two networks of the run's architecture, each with its own optimiser, that train on
    examples selected by their peer. Subclasses define `losses(logits1, logits2, batch)`
    returning (loss1, loss2, stats), or, for one loss shared by both networks (JoCoR's joint
    loss), override `objective`. The first network is the one evaluated."""

    supports_loss_scaling = True

    def __init__(self, ctx, forget_rate: Optional[float], num_gradual: int, forget_exponent: float):
        super().__init__(ctx)
        self.model1 = self.track("model1", ctx.build_model())
        self.model2 = self.track("model2", ctx.build_model())
        self.opt1 = self.track("optimizer1", ctx.make_optimizer(self.model1.parameters()))
        self.opt2 = self.track("optimizer2", ctx.make_optimizer(self.model2.parameters()))
        self.forget_rate = default_forget_rate(ctx.task) if forget_rate is None else float(forget_rate)
        if not 0 <= self.forget_rate < 1:
            raise ValueError(f"--forget-rate must be in [0, 1), got {self.forget_rate}")
        if num_gradual < 0:
            raise ValueError(f"--num-gradual must be >= 0, got {num_gradual}")
        self.num_gradual = num_gradual
        self.forget_exponent = forget_exponent
        self.epoch, self.epoch_forget_rate = 0, 0.0  # set by start_epoch
        # how often network 1 kept each example among its small-loss picks, of how often it saw it
        self.kept_count = self.track("kept_count", torch.zeros(ctx.n_train, dtype=torch.int64, device=ctx.device))
        self.seen_count = self.track("seen_count", torch.zeros(ctx.n_train, dtype=torch.int64, device=ctx.device))

    def scheduled_optimizers(self):
        return [self.opt1, self.opt2]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_forget_rate = forget_rate_at(epoch, self.forget_rate, self.num_gradual, self.forget_exponent)

    def losses(self, logits1, logits2, batch):
        raise NotImplementedError

    def objective(self, logits1, logits2, batch):
        """(the loss both optimisers step on, the loss to report, stats). Default: each
        network's own loss from `losses`; their graphs are disjoint, so the sum gives each
        network its own gradient, and the report is their mean."""
        loss1, loss2, stats = self.losses(logits1, logits2, batch)
        return loss1 + loss2, (loss1 + loss2) / 2, stats

    def train_step(self, batch, clean):
        logits1, logits2 = self.model1(batch.x), self.model2(batch.x)
        loss, reported, stats = self.objective(logits1, logits2, batch)
        self.opt1.zero_grad(set_to_none=True)
        self.opt2.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt1, self.opt2)
        return StepOutput(loss=reported.detach(), stats=stats, logits=logits1.detach())

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        return {"forget_rate": self.epoch_forget_rate}

    def eval_model(self):
        return self.model1

    def example_state(self):
        # written at the batch's rows by `selection_stats`
        return {"kept_count": self.kept_count, "seen_count": self.seen_count}

    audit_default = "drop_rate"

    def audit_signals(self):
        dropped = 1 - self.kept_count.double() / self.seen_count.clamp_min(1).double()
        return {"drop_rate": ExampleSignal(dropped, None, "how often network 1 left the example out of its small-loss selection; score = drop rate")}

    def selection_stats(self, picked: torch.Tensor, batch) -> Dict[str, torch.Tensor]:
        """Fraction of the batch network 1 picked and, for analysis, how many of those carry
        their true label (the papers' "label precision"); counts the picks for the audit."""
        self.kept_count.index_add_(0, batch.index, picked.long())
        self.seen_count.index_add_(0, batch.index, torch.ones_like(batch.index))
        stats = {"selected_frac": picked.float().mean()}
        if batch.y_true is not None:
            stats["label_precision"] = masked_mean((batch.y == batch.y_true).float(), picked)
        return stats
