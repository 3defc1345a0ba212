"""Plain cross-entropy on the noisy labels: the baseline every table starts with."""

from __future__ import annotations

import torch.nn.functional as F

from nrcore.methods.base import SingleModelMethod, StepOutput, register


@register
class CrossEntropy(SingleModelMethod):
    name = "ce"
    supports_loss_scaling = True
    summary = "plain cross-entropy on the noisy labels (baseline; trusted set unused unless --use-clean-in-train)"
    paper = "baseline"

    def __init__(self, ctx):
        super().__init__(ctx)

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), logits=logits.detach())
