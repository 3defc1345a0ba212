"""Co-teaching+ (Yu, Han, Yao, Niu, Tsang and Sugiyama, ICML 2019): Co-teaching restricted to
the examples the two networks disagree on.

Until `init_epoch` the update is Co-teaching's. From then on, the candidates of each step are
the disagreement set `D' = {i : argmax f(x_i) != argmax g(x_i)}`; each network keeps the
`ceil(R(T) |D'|)` candidates with its smallest cross-entropy and its peer is updated on them
(mean cross-entropy of the peer's logits over that selection). The forget-rate schedule and its
options are Co-teaching's.

When the networks agree on the whole batch there is nothing to select. During the first
`--full-batch-steps` optimiser steps (5000, the authors' code; the paper does not describe it)
both networks then train on the whole batch with plain cross-entropy on its noisy labels. This
matters at the start: a freshly initialised BatchNorm CNN predicts nearly one class for every
input, the first updates move both networks to the same class, and under the bare rule (`0`:
the loss is 0, the optimiser step only applies momentum and weight decay) two networks that
agree everywhere never receive a gradient again. On mnist10k with `--full-batch-steps 0` that
collapse to chance happened in all three runs at sym80 and one of three at pair40 (in the first
epoch or by epoch 7). With the fallback (the default) no pair40 or unif40 run collapsed (it fired
on 4-9% of their batches), but at sym80 the networks still stayed near one class (14.7% test
accuracy; docs/methods-baselines.md, Results). `end_epoch` warns once if a whole epoch passes
without a disagreement after the fallback's steps. Each epoch logs `disagreements` (training
examples the networks disagreed on, summed over the epoch's steps) and `full_batch_frac` (the
fraction of steps that fell back to the whole batch). Test/validation accuracy is that of the
first network; cost about twice `ce`.

`--init-epoch` defaults to the authors' per-dataset values (xingruiyu/coteaching_plus
`main.py`): 20 on CIFAR-10(N), 5 on CIFAR-100(N), 0 elsewhere (their MNIST and NEWS value).

Fixed from the authors' code (`loss_coteaching_plus`): it applies softmax and passes the
probabilities to `F.cross_entropy`, which applies log-softmax again, so the selection ranks and
the gradient come from `-log softmax(softmax(z))[y]`, a loss confined to
`[log(C - 1 + e) - 1, log(C - 1 + e)]` (1.47 to 2.47 for C = 10) with small, saturating
gradients; here cross-entropy takes the logits. Also fixed there: the
disagreement indices are built by multiplying dataset indices by a 0/1 mask and dropping zeros
(so the example with dataset index 0 is lost and the last disagreeing example is cut to make the
counts match); the Co-teaching loss it calls divides an averaged loss a second time; and its
step count for the whole-batch fallback is `epoch * i` (i the batch index within the epoch), so
the fallback stays on for every batch of the first epoch and for the first `5000 / epoch`
batches of later ones; nrcore counts optimiser steps. The authors' code also carries a
commented-out schedule (`type_2`) that keeps raising the forget rate towards 2 tau after T_k;
not implemented.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from nrcore.methods.families.selection import TwoNetworkSelection, cross_update_losses
from nrcore.methods.base import Option, register
from nrcore.methods.coteaching import SELECTION_OPTIONS

REFERENCE_INIT_EPOCH = {"cifar10": 20, "cifar10n": 20, "cifar100": 5, "cifar100n": 5}


@register
class CoTeachingPlus(TwoNetworkSelection):
    name = "coteaching-plus"
    summary = "Co-teaching+: Co-teaching on the examples the two networks disagree on, after a Co-teaching warm-up"
    paper = "Yu et al., ICML 2019"
    options = SELECTION_OPTIONS + (
        Option("init_epoch", int, None, "epochs of plain Co-teaching before the disagreement rule; unset: 20 on CIFAR-10, 5 on CIFAR-100, 0 otherwise (the authors' values)"),
        Option("full_batch_steps", int, 5000, "during the first this many optimiser steps, a batch on which the networks agree everywhere trains both on the whole batch with cross-entropy (the authors' code; 0: no update, the bare rule of the paper)"),
    )

    def __init__(self, ctx, forget_rate: Optional[float] = None, num_gradual: int = 10, forget_exponent: float = 1.0, init_epoch: Optional[int] = None, full_batch_steps: int = 5000):
        super().__init__(ctx, forget_rate, num_gradual, forget_exponent)
        self.init_epoch = REFERENCE_INIT_EPOCH.get(ctx.task.dataset, 0) if init_epoch is None else int(init_epoch)
        if self.init_epoch < 0:
            raise ValueError(f"--init-epoch must be >= 0, got {self.init_epoch}")
        if full_batch_steps < 0:
            raise ValueError(f"--full-batch-steps must be >= 0, got {full_batch_steps}")
        self.full_batch_steps = full_batch_steps
        self.steps_done = self.track("steps_done", 0)  # a host-side count: no sync
        self.disagreements = torch.zeros((), dtype=torch.long, device=ctx.device)  # this epoch's, summed on the device
        self.warned_stall = False

    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        self.disagreements.zero_()

    def losses(self, logits1, logits2, batch):
        keep = 1 - self.epoch_forget_rate
        self.steps_done += 1
        if self.epoch < self.init_epoch:
            loss1, loss2, picked1, _ = cross_update_losses(logits1, logits2, batch.y, keep)
            return loss1, loss2, self.selection_stats(picked1, batch)
        disagree = logits1.argmax(dim=1) != logits2.argmax(dim=1)
        self.disagreements += disagree.sum()
        if self.steps_done <= self.full_batch_steps:
            whole_batch = ~disagree.any()  # a device tensor: no `if` on it, no sync
        else:
            whole_batch = torch.zeros((), dtype=torch.bool, device=disagree.device)
        loss1, loss2, picked1, _ = cross_update_losses(logits1, logits2, batch.y, keep, candidates=disagree, select_all=whole_batch)
        stats = {**self.selection_stats(picked1, batch), "disagree_frac": disagree.float().mean(), "full_batch_frac": whole_batch.float()}
        return loss1, loss2, stats

    def end_epoch(self, epoch):
        out = {**super().end_epoch(epoch), "disagreement_rule": int(epoch >= self.init_epoch)}
        if epoch >= self.init_epoch:
            out["disagreements"] = int(self.disagreements)  # one host sync per epoch
            if out["disagreements"] == 0 and self.steps_done > self.full_batch_steps and not self.warned_stall:
                self.warned_stall = True
                warnings.warn(
                    f"coteaching-plus: the two networks agreed on every training example in epoch {epoch + 1}, so "
                    "nothing was selected and they stopped learning; this cannot recover (try a larger --init-epoch "
                    "or coteaching)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return out
