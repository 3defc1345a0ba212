"""CORES² phase 1 (Cheng, Zhu, Li, Gong, Sun and Liu, ICLR 2021): a confidence-regularised loss
and the sample sieve it makes possible. Phase 2 (consistency training on the sieved-out
examples) is not implemented.

The confidence-regularised loss of an example with noisy label y~ is

    l_CR(x, y~) = CE(f(x), y~) - beta(T) * sum_j P(y~ = j) * (-log(p_j(x) + 1e-8))

with P(y~) the class prior of the noisy labels: at first that of the whole training split, and
after every epoch that of the examples the sieve did not drop in it (the authors'
`noise_prior_cur`). The regulariser rewards confident predictions, which is what lets the
sieve separate the examples: one is kept when

    v_i = 1{ CE(f(x_i), y~_i) - (1/K) sum_j (-log(p_j(x_i) + 1e-8)) <= 0 },

i.e. l_CR <= alpha_i with the paper's threshold alpha_i, in which the regulariser cancels (the
authors' `loss_cores`, `loss_sel <= 0`). The model steps on the mean l_CR over the kept
examples. The sieve stays off (everything kept) during the first `--cores-sieve-warmup` epochs;
beta is 0 during the first `--cores-beta-warmup` epochs and then rises linearly to
`--cores-beta` over `--cores-beta-ramp` epochs; the learning rate is divided by 1 + beta(T)
(the authors' `adjust_learning_rate`; `--no-cores-lr-scaling` turns that off). The authors'
schedule is for 100 epochs (beta 0 for 10, linspace(0, 2, 30), sieve from epoch 31): unset, the
three epoch counts are those scaled to --epochs (10%, 30%, 31%), exactly the authors' at 100.

Per example the method keeps its last sieve decision (its loss weight, exposed as the example
weight), its last sieve score and how often the active sieve saw and dropped it; the audit
signals are the drop rate and the last score. Same cost as `ce`. docs/methods-baselines.md has
the long form and where the code and paper differ.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from nrcore.methods.base import ExampleSignal, Option, SingleModelMethod, StepOutput, check_number, masked_mean, register

# the authors' phase-1 schedule (haochenglouis/cores, loss.py `f_beta`, `loss_cores`), over their 100 epochs
REFERENCE_EPOCHS = 100
REFERENCE_BETA_WARMUP = 10  # beta1 = linspace(0, 0, 10)
REFERENCE_BETA_RAMP = 30  # beta2 = linspace(0, 2, 30)
REFERENCE_SIEVE_WARMUP = 31  # `if epoch <= 30: loss_v = 1`
LOG_EPS = 1e-8  # -log(softmax + 1e-8): bounds each term of the regulariser, which is unbounded below without it


def scaled_epochs(reference: int, epochs: int) -> int:
    """`reference` epochs of the authors' 100-epoch schedule, scaled to a run of `epochs` (half up)."""
    return int(math.floor(reference * epochs / REFERENCE_EPOCHS + 0.5))


def cores_beta_at(epoch: int, beta: float, warmup: int, ramp: int) -> float:
    """beta during `epoch` (0-based): 0 for `warmup` epochs, then `linspace(0, beta, ramp)`, then
    `beta` (the authors' `f_beta` with warmup 10, ramp 30, beta 2)."""
    k = epoch - warmup
    if k < 0:
        return 0.0
    if k >= ramp:
        return float(beta)
    return float(beta) * k / (ramp - 1) if ramp > 1 else 0.0


def cores_losses(logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor, beta: float):
    """(l_CR [B], sieve score [B]) of the module docstring; the example is kept when its score is <= 0."""
    z = logits.float()
    ce = F.cross_entropy(z, labels, reduction="none")
    every = -torch.log(torch.softmax(z, dim=1) + LOG_EPS)  # [B, K]: the loss of each possible label
    regularised = ce - beta * (every * prior.to(every.dtype)).sum(dim=1)
    score = ce - every.mean(dim=1)
    return regularised, score


def noisy_prior(labels: torch.Tensor, num_classes: int, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 [K]: the class distribution of the noisy `labels` over the examples with `kept`
    true (all without it); None when nothing is kept."""
    weights = None if kept is None else kept.double()
    counts = torch.bincount(labels, weights=weights, minlength=num_classes).double()
    total = counts.sum()
    return None if total <= 0 else counts / total


@register
class Cores(SingleModelMethod):
    name = "cores"
    summary = "CORES² phase 1: confidence-regularised cross-entropy and a sample sieve that drops the examples it deems corrupted"
    paper = "Cheng et al., ICLR 2021"
    supports_loss_scaling = True
    options = (
        Option("cores_beta", float, 2.0, "largest beta, the weight of the confidence regulariser (the authors' 2)"),
        Option("cores_beta_warmup", int, None, "epochs with beta = 0 before its ramp; unset: 10% of --epochs (the authors' 10 of 100)"),
        Option("cores_beta_ramp", int, None, "epochs over which beta rises linearly from 0 to --cores-beta (linspace); unset: 30% of --epochs (the authors' 30 of 100)"),
        Option("cores_sieve_warmup", int, None, "epochs during which the sieve keeps every example; unset: 31% of --epochs (the authors' 31 of 100)"),
        Option("cores_lr_scaling", bool, True, "divide the learning rate by 1 + beta during each epoch (the authors' code)"),
    )

    def __init__(self, ctx, cores_beta: float = 2.0, cores_beta_warmup: Optional[int] = None, cores_beta_ramp: Optional[int] = None,
                 cores_sieve_warmup: Optional[int] = None, cores_lr_scaling: bool = True):  # fmt: skip
        super().__init__(ctx)
        check_number("cores_beta", cores_beta, minimum=0)
        self.beta_max = float(cores_beta)
        epochs = ctx.epochs
        self.beta_warmup = scaled_epochs(REFERENCE_BETA_WARMUP, epochs) if cores_beta_warmup is None else cores_beta_warmup
        self.beta_ramp = scaled_epochs(REFERENCE_BETA_RAMP, epochs) if cores_beta_ramp is None else cores_beta_ramp
        self.sieve_warmup = scaled_epochs(REFERENCE_SIEVE_WARMUP, epochs) if cores_sieve_warmup is None else cores_sieve_warmup
        for name, value in (("cores_beta_warmup", self.beta_warmup), ("cores_beta_ramp", self.beta_ramp), ("cores_sieve_warmup", self.sieve_warmup)):
            check_number(name, value, minimum=0)
            if value != int(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number of epochs, got {value!r}")
        self.beta_warmup, self.beta_ramp, self.sieve_warmup = int(self.beta_warmup), int(self.beta_ramp), int(self.sieve_warmup)
        self.lr_scaling = bool(cores_lr_scaling)

        n, device = ctx.n_train, ctx.device
        self.labels = ctx.task.train.labels.to(device)  # the noisy labels, for the prior
        start = noisy_prior(self.labels, ctx.num_classes)
        # the prior of the current epoch (the regulariser's P(y~)), re-estimated at each epoch's end
        self.prior = self.track("prior", (start if start is not None else torch.full((ctx.num_classes,), 1.0 / ctx.num_classes)).float().to(device))
        # per example, written at the batch's rows (example_state): the last decision (1 kept,
        # 0 dropped), the last sieve score, the steps the active sieve saw / dropped it, and the
        # last epoch it was dropped in (-1: never), from which the next prior is counted
        self.last_kept = self.track("last_kept", torch.ones(n, device=device))
        self.last_score = self.track("last_score", torch.zeros(n, device=device))
        self.sieve_seen = self.track("sieve_seen", torch.zeros(n, dtype=torch.int64, device=device))
        self.sieve_dropped = self.track("sieve_dropped", torch.zeros(n, dtype=torch.int64, device=device))
        self.dropped_epoch = self.track("dropped_epoch", torch.full((n,), -1, dtype=torch.int64, device=device))
        self.epoch, self.beta, self.sieve_on, self.lr_divisor = 0, 0.0, False, 1.0  # set by start_epoch

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.beta = cores_beta_at(epoch, self.beta_max, self.beta_warmup, self.beta_ramp)
        self.sieve_on = epoch >= self.sieve_warmup
        self.lr_divisor = 1.0 + self.beta if self.lr_scaling else 1.0
        # the trainer has just set this epoch's learning rate from the schedule
        for group in self.opt.param_groups:
            group["lr"] = group["lr"] / self.lr_divisor

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        regularised, score = cores_losses(logits, batch.y, self.prior, self.beta)
        score = score.detach()
        if self.sieve_on:  # a host-side flag: no sync
            kept = score <= 0
        else:
            kept = torch.ones_like(score, dtype=torch.bool)
        loss = masked_mean(regularised, kept)
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)

        index = batch.index
        self.last_kept[index] = kept.to(self.last_kept.dtype)
        self.last_score[index] = score.to(self.last_score.dtype)
        if self.sieve_on:
            self.sieve_seen.index_add_(0, index, torch.ones_like(index))
            self.sieve_dropped.index_add_(0, index, (~kept).long())
            self.dropped_epoch[index] = torch.where(kept, self.dropped_epoch[index], torch.full_like(index, self.epoch))
        stats = {"selected_frac": kept.float().mean()}
        if batch.y_true is not None:
            stats["label_precision"] = masked_mean((batch.y == batch.y_true).float(), kept)
        return StepOutput(loss=loss.detach(), stats=stats, logits=logits.detach())

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        dropped = self.dropped_epoch == epoch
        # the next epoch's prior: the noisy labels of the examples not dropped in this one (one
        # sync per epoch); if the sieve dropped every example, the prior stays
        prior = noisy_prior(self.labels, self.ctx.num_classes, kept=~dropped)
        if prior is not None:
            self.prior.copy_(prior.to(self.prior.dtype))
        return {
            "cores_beta": self.beta,
            "sieve_on": int(self.sieve_on),
            "lr_divisor": self.lr_divisor,
            "sieve_dropped": int(dropped.sum()),  # training examples dropped at their step in this epoch
        }

    def example_weights(self):
        """The loss weight of each example's last step: 1 kept (and always during the warm-up), 0 dropped."""
        return self.last_kept

    def example_state(self):
        return {
            "last_kept": self.last_kept, "last_score": self.last_score, "sieve_seen": self.sieve_seen,
            "sieve_dropped": self.sieve_dropped, "dropped_epoch": self.dropped_epoch,
        }  # fmt: skip

    audit_default = "sieve_score"  # ranked the mislabelled digits better than the drop rate in every run tried (docs)

    def audit_signals(self):
        drop_rate = self.sieve_dropped.double() / self.sieve_seen.clamp_min(1).double()
        return {
            "sieve_drop_rate": ExampleSignal(drop_rate, None, "how often the active sample sieve dropped the example; score = drop rate (0 if the sieve never ran)"),
            "sieve_score": ExampleSignal(self.last_score.double(), None, "CE(f(x), y~) minus the mean CE over all labels at the example's last step; the sieve drops it above 0"),
        }
