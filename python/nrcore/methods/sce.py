"""Symmetric cross entropy (Wang, Ma, Chen, Luo, Yi and Bailey, ICCV 2019; arXiv 1908.06112).

Cross-entropy plus its reverse, the cross-entropy of the one-hot label q under the prediction p:

    L = alpha CE + beta RCE,   CE = -log p_y,   RCE = -sum_c p_c log q_c = -A (1 - p_y)

with `log 0 := A = -4` (the paper). RCE is bounded and symmetric (proportional to MAE), so robust
to the noise; CE keeps the hard classes learning. `--sce-alpha` / `--sce-beta` default to the
paper's CIFAR-10 values 0.1 / 1.0 (MNIST 0.01 / 1.0, CIFAR-100 6.0 / 0.1).

The authors' code (YisenWang/symmetric_cross_entropy_for_noisy_labels, loss.py) clips the
one-hot label to [1e-4, 1] before its natural log, so its A is ln(1e-4) = -9.21, not -4: the
same loss as the paper's with beta scaled by 9.21 / 4 = 2.30 (`--sce-beta 2.303` gives the
code's beta = 1). It clips p to [1e-7, 1] inside CE only (CE's gradient vanishes where
p_y < 1e-7), as here. Same cost as `ce`. docs/methods-baselines.md, "Symmetric cross
entropy", has the long form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nrcore.methods.base import Option, SingleModelMethod, StepOutput, check_number, register

LOG_ZERO = -4.0  # A, the value RCE gives log 0 (the paper)
CE_PROB_FLOOR = 1e-7  # the authors' code clips p to [1e-7, 1] inside CE


def sce_terms(logits: torch.Tensor, labels: torch.Tensor, log_zero: float = LOG_ZERO):
    """Per-example (CE, RCE), each [B], in float32 (see the module docstring)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    # -log clip(p_y, 1e-7, 1): a clamp of log p, so no underflow of p itself
    ce = -log_p.gather(1, labels[:, None]).squeeze(1).clamp_min(math.log(CE_PROB_FLOOR))
    others = torch.ones_like(log_p).scatter(1, labels[:, None], 0.0)  # not F.one_hot: it reads the labels' range on the host
    rce = -log_zero * (log_p.exp() * others).sum(dim=1)  # -A sum_{c != y} p_c = -A (1 - p_y), exact near p_y = 1
    return ce, rce


@register
class SymmetricCrossEntropy(SingleModelMethod):
    name = "sce"
    supports_loss_scaling = True
    summary = "symmetric cross entropy: alpha CE + beta reverse CE (log 0 := -4), a bounded noise-robust term added to CE"
    paper = "Wang et al., ICCV 2019"
    options = (
        Option("sce_alpha", float, 0.1, "alpha, weight of cross-entropy (paper: 0.1 CIFAR-10, 0.01 MNIST, 6.0 CIFAR-100)"),
        Option("sce_beta", float, 1.0, "beta, weight of reverse cross-entropy (paper: 1.0 CIFAR-10 and MNIST, 0.1 CIFAR-100)"),
    )

    def __init__(self, ctx, sce_alpha: float = 0.1, sce_beta: float = 1.0):
        super().__init__(ctx)
        check_number("sce_alpha", sce_alpha, minimum=0)
        check_number("sce_beta", sce_beta, minimum=0)
        if sce_alpha == 0 and sce_beta == 0:
            raise ValueError("--sce-alpha and --sce-beta are both 0: the loss would be 0")
        self.alpha, self.beta = float(sce_alpha), float(sce_beta)

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        ce, rce = sce_terms(logits, batch.y)
        ce, rce = ce.mean(), rce.mean()
        loss = self.alpha * ce + self.beta * rce
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), stats={"ce": ce.detach(), "rce": rce.detach()}, logits=logits.detach())

    # No audit signal of its own: the per-example loss is a decreasing function of p(given label),
    # which the trainer's `final_prediction` (and `aum`) already rank by.
