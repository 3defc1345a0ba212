"""Learning to Reweight Examples (Ren, Zeng, Yang, Urtasun, ICML 2018).

Per step, weights are made afresh from the hypergradient at zero weights: with
`θ'(ε) = θ - lr ∇θ (1/|B|) Σ_i ε_i l_i(θ)` and the clean loss `L_val(θ'(ε))`,

    u_i = -∂L_val/∂ε_i |ε=0  ∝  <∇θ l_i(θ), ∇θ L_val(θ)>      (θ'(0) = θ: no look-ahead forward)
    w_i = max(u_i, 0) / Σ_k max(u_k, 0)     (all zero when no example helps)
    θ  <- SGD(θ, ∇θ Σ_i w_i l_i(θ))

Exposed per-example weight (`example_weights`, in [0, 1]): the latest batch-relative weight each
example received, `w_i / max_k w_k` over its batch (1 = the most useful example of its batch,
0 = dropped); 1 before an example has been seen.
"""

from __future__ import annotations

import torch

from nrcore.methods.families.reweighting import HYPERGRAD_OPTION, MetaGradient, ReweightingMethod
from nrcore.methods.base import StepOutput, register


@register
class LearningToReweight(ReweightingMethod):
    name = "l2rw"
    summary = "Learning to Reweight: per-batch weights from the clipped, normalised hypergradient at zero weights"
    paper = "Ren et al., ICML 2018"
    options = (HYPERGRAD_OPTION,)
    initial_weight = 1.0

    def __init__(self, ctx, hypergrad):
        super().__init__(ctx)
        self.metagrad = MetaGradient(self.model, self.opt, rule="sgd", mode=hypergrad, ctx=ctx)

    def train_step(self, batch, clean):
        fwd = self.metagrad.forward(batch.x, batch.y, batch.total)
        zeros = torch.zeros_like(fwd.losses)
        hypergrad, val_loss = self.metagrad.hypergradient(fwd, zeros, clean.x, clean.y, at_zero=True)
        useful = (-hypergrad).clamp_min(0.0)
        tiny = torch.finfo(useful.dtype).tiny  # all zero stays all zero
        ranks = self.ctx.ranks  # under torchrun: normalised over the whole batch
        weights = useful / ranks.sum(useful.sum()).clamp_min(tiny)
        self.weights[batch.index] = useful / ranks.max(useful.max()).clamp_min(tiny)
        loss = self.metagrad.step(fwd, weights, mean=False)
        return StepOutput(loss=loss, stats={"meta_loss": val_loss, "kept": (useful > 0).float().mean()}, logits=fwd.logits)
