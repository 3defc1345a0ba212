"""Bootstrapping (Reed, Lee, Anguelov, Szegedy, Erhan and Rabinovich, ICLR workshop 2015;
arXiv 1412.6596, 2014).

The target is a convex combination of the given (noisy) label t and the model's own belief:

* soft:  `L = -sum_k [beta t_k + (1 - beta) q_k] log q_k`, q = softmax(logits), beta = 0.95.
  The paper notes this equals cross-entropy plus `(1 - beta)` times the entropy of q, i.e.
  minimum-entropy regularisation, so the gradient flows through the q in the target as well
  (as in Patrini et al.'s Keras `boot_soft`); implementations that detach q there compute a
  different objective.
* hard:  `L = -sum_k [beta t_k + (1 - beta) z_k] log q_k`, z the one-hot of argmax q (no
  gradient through the argmax), beta = 0.8.

`--bootstrap-mode soft|hard` picks the variant; `--bootstrap-beta` overrides the paper's beta
for that variant. Same cost as `ce`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from nrcore.methods.base import Option, SingleModelMethod, StepOutput, register

PAPER_BETA = {"soft": 0.95, "hard": 0.8}


def bootstrap_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float, mode: str) -> torch.Tensor:
    """Per-example bootstrapping loss [B] (see the module docstring)."""
    log_q = F.log_softmax(logits.float(), dim=1)
    given = -log_q.gather(1, labels[:, None]).squeeze(1)
    if mode == "soft":
        belief = -(log_q.exp() * log_q).sum(dim=1)  # entropy of q, differentiated through q
    elif mode == "hard":
        belief = -log_q.gather(1, log_q.argmax(dim=1, keepdim=True)).squeeze(1)
    else:
        raise ValueError(f"bootstrap mode must be 'soft' or 'hard', got {mode!r}")
    return beta * given + (1 - beta) * belief


@register
class Bootstrap(SingleModelMethod):
    name = "bootstrap"
    supports_loss_scaling = True
    summary = "bootstrapping: target mixes the noisy label with the model's soft (beta 0.95) or hard (beta 0.8) prediction"
    paper = "Reed et al., ICLR workshop 2015"
    options = (
        Option("bootstrap_mode", ("soft", "hard"), "soft", "soft: mix in the predicted distribution (beta 0.95); hard: mix in its argmax (beta 0.8)"),
        Option("bootstrap_beta", float, None, "weight of the given label in the target; unset: the paper's 0.95 (soft) or 0.8 (hard)"),
    )

    def __init__(self, ctx, bootstrap_mode: str = "soft", bootstrap_beta: Optional[float] = None):
        super().__init__(ctx)
        if bootstrap_mode not in PAPER_BETA:
            raise ValueError(f"--bootstrap-mode must be soft or hard, got {bootstrap_mode!r}")
        self.mode = bootstrap_mode
        self.beta = PAPER_BETA[bootstrap_mode] if bootstrap_beta is None else float(bootstrap_beta)
        if not 0 <= self.beta <= 1:
            raise ValueError(f"--bootstrap-beta must be in [0, 1], got {self.beta}")

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        loss = bootstrap_loss(logits, batch.y, self.beta, self.mode).mean()
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), logits=logits.detach())

    def end_epoch(self, epoch):
        return {"bootstrap_beta": self.beta}
