"""Co-teaching (Han, Yao, Yu, Niu, Xu, Hu, Tsang and Sugiyama, NeurIPS 2018).

Two networks f and g of the run's architecture see the same noisy batch. Each keeps the
fraction `R(T)` of the batch with its smallest cross-entropy and hands it to its peer:
f is updated on g's small-loss examples and g on f's,

    loss_f = mean_{i in D_g} CE(f(x_i), y~_i),   D_g = the ceil(R(T) |B|) smallest CE(g(x), y~)

(and symmetrically). The forget rate `1 - R(T) = tau * min(T^c / T_k, 1)` grows from 0 to tau
over the first `T_k` epochs (`--num-gradual`, 10; `--forget-exponent` c, 1), tau defaults to
the nominal noise rate of the task (`--forget-rate`; note unifR corrupts only r(C-1)/C of the
labels). Test/validation accuracy is that of the first network. Costs about twice `ce` (two
forwards and backwards per step).

Fixed from the authors' code (bhanML/Co-teaching, `loss_coteaching`): it takes the mean
cross-entropy over the selected examples and then divides its sum by the number selected again,
so the loss (and, with SGD, the step) shrinks by `1/num_remember`; with Adam, as the authors
ran it, this mostly cancels. Here the selected losses are averaged once. Optimiser and schedule
are the run's (SGD with momentum), not the paper's Adam with linear decay, so all methods share
one harness.
"""

from __future__ import annotations

from typing import Optional

from nrcore.methods.families.selection import TwoNetworkSelection, cross_update_losses
from nrcore.methods.base import Option, register

SELECTION_OPTIONS = (
    Option("forget_rate", float, None, "tau: fraction of each batch dropped once the ramp is over; unset: the task's nominal noise rate"),
    Option("num_gradual", int, 10, "T_k: epochs over which the forget rate ramps from 0 to tau"),
    Option("forget_exponent", float, 1.0, "c in the ramp tau * min(T^c / T_k, 1) (Co-teaching's sensitivity study: 0.5, 1, 2)"),
)


@register
class CoTeaching(TwoNetworkSelection):
    name = "coteaching"
    summary = "Co-teaching: two networks, each trained on the other's small-loss examples"
    paper = "Han et al., NeurIPS 2018"
    options = SELECTION_OPTIONS

    def __init__(self, ctx, forget_rate: Optional[float] = None, num_gradual: int = 10, forget_exponent: float = 1.0):
        super().__init__(ctx, forget_rate, num_gradual, forget_exponent)

    def losses(self, logits1, logits2, batch):
        loss1, loss2, picked1, _ = cross_update_losses(logits1, logits2, batch.y, 1 - self.epoch_forget_rate)
        return loss1, loss2, self.selection_stats(picked1, batch)
