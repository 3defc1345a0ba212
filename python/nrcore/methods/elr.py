"""Early-learning regularisation, ELR (Liu, Niles-Weed, Razavian and Fernandez-Granda, NeurIPS
2020; arXiv 2007.00151). ELR, not ELR+ (no second network, mixup or weight averaging).

During early learning a network predicts the true class of many mislabelled examples before it
memorises their labels. ELR keeps, for every training example, a temporal ensemble of the
model's predictions and pulls the prediction towards it:

    t_i <- beta t_i + (1 - beta) p^_i / sum(p^_i)          (each time example i is in a batch)
    L   = CE(logits, y~) + lambda mean_i log(1 - <p^_i, t_i>)

p^ = softmax clamped to [1e-4, 1 - 1e-4] (the authors' code, shengliu66/ELR, ELR/model/loss.py:
it keeps 1 - <p^, t> >= 1e-4), the target detached, updated before the loss reads it, starting
at 0. `--elr-lambda` / `--elr-beta` default to the authors' CIFAR-10 (symmetric noise) config,
3 / 0.7 (CIFAR-100: 7 / 0.9; asymmetric CIFAR-10: 1 / 0.9).

The targets [n_train, C] are method state (checkpointed, `example_state()`). Audit signal
`elr_target`: 1 - the normalised target's mass on the given label, suggestion its argmax (the
ensemble's opinion). Same step cost as `ce`. docs/methods-baselines.md, "Early-learning
regularisation", has the long form.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from nrcore.methods.base import ExampleSignal, Option, SingleModelMethod, StepOutput, check_number, register

PROB_CLAMP = 1e-4  # the authors' code clamps the softmax to [1e-4, 1 - 1e-4]


def elr_update_and_regulariser(logits: torch.Tensor, targets: torch.Tensor, beta: float):
    """(new targets [B, C] detached, per-example log(1 - <p^, t>) [B]) from the batch's logits and
    its rows of the targets (see the module docstring); float32."""
    p = F.softmax(logits.float(), dim=1).clamp(PROB_CLAMP, 1 - PROB_CLAMP)
    q = p.detach()
    new_targets = beta * targets + (1 - beta) * (q / q.sum(dim=1, keepdim=True))
    return new_targets, torch.log(1 - (new_targets * p).sum(dim=1))


@register
class EarlyLearningRegularization(SingleModelMethod):
    name = "elr"
    supports_loss_scaling = True
    summary = "ELR: CE + lambda log(1 - <p, t>), t a per-example temporal ensemble of the model's predictions"
    paper = "Liu et al., NeurIPS 2020"
    options = (
        Option("elr_lambda", float, 3.0, "lambda, weight of the regulariser (authors' configs: 3 CIFAR-10, 7 CIFAR-100, 1 asymmetric CIFAR-10)"),
        Option("elr_beta", float, 0.7, "beta in [0, 1), momentum of the per-example target ensemble (0.7 CIFAR-10, 0.9 CIFAR-100 and asymmetric CIFAR-10)"),
    )

    def __init__(self, ctx, elr_lambda: float = 3.0, elr_beta: float = 0.7):
        super().__init__(ctx)
        check_number("elr_lambda", elr_lambda, minimum=0)
        check_number("elr_beta", elr_beta, minimum=0)
        if elr_beta >= 1:
            raise ValueError(f"--elr-beta must be < 1 (at 1 the targets never leave 0), got {elr_beta!r}")
        self.lam, self.beta = float(elr_lambda), float(elr_beta)
        self.targets = self.track("targets", torch.zeros(ctx.n_train, ctx.num_classes, dtype=torch.float32, device=ctx.device))

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        new_targets, reg = elr_update_and_regulariser(logits, self.targets.index_select(0, batch.index), self.beta)
        self.targets.index_copy_(0, batch.index, new_targets)
        ce = F.cross_entropy(logits.float(), batch.y)
        reg = reg.mean()
        loss = ce + self.lam * reg
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), stats={"ce": ce.detach(), "elr_reg": reg.detach()}, logits=logits.detach())

    def example_state(self) -> Dict[str, torch.Tensor]:
        return {"targets": self.targets}

    def _normalised_targets(self) -> torch.Tensor:
        """The targets as distributions (after k visits they sum to 1 - beta^k); uniform before any."""
        mass = self.targets.sum(dim=1, keepdim=True)
        uniform = torch.full_like(self.targets, 1.0 / self.targets.shape[1])
        return torch.where(mass > 0, self.targets / mass.clamp_min(1e-30), uniform)

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        """How often the ensemble's argmax is the given label and, where known, the true one
        (analysis only: the true labels never reach training)."""
        split = self.ctx.task.train
        guess = self.targets.argmax(dim=1).cpu()
        out = {"elr_target_agree": float((guess == split.labels).double().mean())}
        known = split.true_labels >= 0
        if bool(known.any()):
            out["elr_target_acc"] = float((guess[known] == split.true_labels[known]).double().mean())
        return out

    audit_default = "elr_target"

    def audit_signals(self):
        t = self._normalised_targets().double()
        labels = self.ctx.task.train.labels.to(t.device)
        given = t.gather(1, labels[:, None])[:, 0]
        return {"elr_target": ExampleSignal(1 - given, t.argmax(dim=1),
                                            "ELR's per-example target (temporal ensemble of the predictions), normalised; score = 1 - t[given label]")}
