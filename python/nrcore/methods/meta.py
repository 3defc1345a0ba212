"""Bilevel meta-reweighting of the FBR paper's Section 2 (Zhang, Holtz et al., 2025).

Per step, with the noisy batch B, its persistent weights `w_i ∈ [0, 1]` (initialised to 1/2)
and a clean batch V:

    θ'(w)  = θ - lr ∇θ (1/|B|) Σ_i w_i l_i(θ)             pseudo update (plain SGD, current lr)
    L_val  = (1/|V|) Σ_j l^v_j(θ'(w))
    w_i   <- clip[0,1](w_i - α ∂L_val/∂w_i),   α = β/η,   η = lr/|B|
    θ     <- SGD(θ, ∇θ (1/|B|) Σ_i w_i l_i(θ))             real step with the new weights (Eq. 2)

η = lr/|B| is the step each example's loss takes in the pseudo update, so with the exact
hypergradient `∂L_val/∂w_i = -η <∇θ l_i(θ), ∇θ L_val(θ')>` the update is
`w_i <- clip(w_i + β <∇θ l_i(θ), ∇θ L_val(θ')>)`: β is the weight change per unit of
gradient alignment, independent of the learning rate and batch size (the paper's `αη = β`).

`--hypergrad` picks how the inner products are computed, all without second derivatives but
`autograd` (see nrcore.methods.families.reweighting): `tangent` (per-example gradients of one recorded
backward, nrcore.ops; exact without train-mode BatchNorm), `jvp` (forward mode; exact always),
`autograd` (through the pseudo update; the reference) or `auto` (default: tangent for models
without BatchNorm, jvp for models with it).
"""

from __future__ import annotations

from nrcore.methods.families.reweighting import HYPERGRAD_OPTION, MetaGradient, ReweightingMethod
from nrcore.methods.base import Option, StepOutput, check_number, register


@register
class MetaReweighting(ReweightingMethod):
    name = "meta"
    summary = "bilevel meta-reweighting: persistent weights in [0,1], exact one-step hypergradient (FBR paper, Sec. 2)"
    paper = "Zhang, Holtz, Mishne, Cloninger, arXiv 2510.12209 (2025)"
    options = (
        Option("beta", float, 1.0, "weight step per unit of gradient alignment (α = β/η)"),
        HYPERGRAD_OPTION,
    )

    def __init__(self, ctx, beta, hypergrad):
        check_number("beta", beta, minimum=0)  # β < 0 would move weights against the clean loss
        super().__init__(ctx)
        self.beta = beta
        self.metagrad = MetaGradient(self.model, self.opt, rule="sgd", mode=hypergrad, ctx=ctx)

    def train_step(self, batch, clean):
        fwd = self.metagrad.forward(batch.x, batch.y, batch.total)
        w_old = self.weights[batch.index]
        hypergrad, val_loss = self.metagrad.hypergradient(fwd, w_old, clean.x, clean.y)
        eta = self.opt.param_groups[0]["lr"] / batch.total  # per-example step of the pseudo update
        w_new = (w_old - (self.beta / eta) * hypergrad).clamp_(0.0, 1.0)
        self.weights[batch.index] = w_new
        loss = self.metagrad.step(fwd, w_new)
        return StepOutput(loss=loss, stats={"meta_loss": val_loss, "batch_weight": w_new.mean()}, logits=fwd.logits)
