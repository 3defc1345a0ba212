"""Feature-Based Reweighting, FBR (Algorithm 1 of Zhang, Holtz et al., 2025).

A lightweight surrogate of meta-reweighting: the weight direction is a label-signed,
row-shifted similarity between an example's centred penultimate features and the clean set's.

Once per epoch (Algorithm 1, lines 3-4), with φ the current model's penultimate features of the
whole trusted set (m examples, n_c of class c; train-mode BatchNorm with the trusted set's own
batch statistics, running statistics untouched, no augmentation: the same BatchNorm mode as the
batch features below):

    μ = (1/m) Σ_j φ(x^v_j)   (0 with --no-center),   M_c = mean_{j: y^v_j = c} (φ(x^v_j) - μ)

Per batch, with φ_i the batch's features from the same forward as the loss (detached):

    K_ij     = (φ_i - μ)·(φ(x^v_j) - μ),    s_ic = mean_{j: y^v_j = c} K_ij = (φ_i - μ)·M_c
    shift_i  = s_i,c2   (c2: the class with the 2nd largest s_ic; 0 with --no-row-shift)
    d_i      = Σ_j (λ+ [y_i = y^v_j] - λ- [y_i ≠ y^v_j]) (K_ij - shift_i)
             = λ+ n_yi (s_i,yi - shift_i) - λ- ((T_i - n_yi s_i,yi) - (m - n_yi) shift_i),  T_i = Σ_j K_ij
    w_i     <- clip[0,1](w_i + α d_i)            (sign fixed: Algorithm 1 line 14 prints `-`)
    θ       <- SGD(θ, ∇θ (1/|B|) Σ_i w_i l_i(θ))    with the UPDATED weights (Eq. 2)

The closed form (right) is computed by nrcore.ops without the B x m matrix. With a balanced
clean set and the default λ+ = 1, λ- = 1/(C-1) every mask row sums to zero and the row shift
cancels exactly (d_i = n C/(C-1) s_i,yi); it acts only with an unbalanced clean set or other λ.
--no-label-sign drops the mask (d_i = Σ_j (K_ij - shift_i)).

--normalize (default) divides d by m · mean_j |φ(x^v_j) - μ|², so one step size α suits every
model and feature width; the default α was chosen by measurement (docs/methods-reweighting.md).
λ- is constant by default; `--lambda-schedule linear` moves it linearly from --lambda-neg in the
first epoch to --lambda-neg-end in the last (our reading of the paper's unspecified annealing).
"""

from __future__ import annotations

from typing import Optional

import torch

from nrcore import ops
from nrcore.methods.families.reweighting import ReweightingMethod, per_example_ce, weighted_update
from nrcore.models.inference import split_features
from nrcore.methods.base import Option, StepOutput, check_number, register

# FBR paper, App. D.1 (the FINE setup): ResNet-34, batch 128, SGD lr 0.02, momentum 0.9, weight
# decay 5e-4, x0.1 at epochs 40/80/100 of 120; 2,000 clean examples for every dataset.
PAPER_SETTING = dict(model="resnet34", epochs=120, batch_size=128, lr=0.02, momentum=0.9, weight_decay=5e-4,
                     schedule="multistep", milestones=[40, 80, 100], gamma=0.1, clean_size=2000, clean_frac=None)

FBR_OPTIONS = (
    Option("step_size", float, 1.0, "weight step size α (on the normalised direction unless --no-normalize)"),
    Option("lambda_pos", float, 1.0, "λ+: mask value for clean examples of the same label"),
    Option("lambda_neg", float, None, "λ-: mask value (negated) for clean examples of other labels; default 1/(C-1)"),
    Option("lambda_schedule", ("constant", "linear"), "constant", "λ- over epochs: constant, or linear from --lambda-neg to --lambda-neg-end"),
    Option("lambda_neg_end", float, 0.0, "λ- in the last epoch with --lambda-schedule linear"),
    Option("center", bool, True, "centre features on the clean-set mean"),
    Option("row_shift", bool, True, "subtract each row's 2nd-largest class similarity"),
    Option("label_sign", bool, True, "sign similarities by label agreement (λ+ / -λ-)"),
    Option("normalize", bool, True, "divide the direction by m · mean squared norm of the centred clean features"),
)


class FeatureReweightingBase(ReweightingMethod):
    """Algorithm 1's schedule and bookkeeping; subclasses say what the features are."""

    options = FBR_OPTIONS

    def __init__(self, ctx, step_size, lambda_pos, lambda_neg, lambda_schedule, lambda_neg_end, center, row_shift, label_sign, normalize):
        # negative values would turn the method around (up-weight what disagrees with the clean set)
        for name, value in (("step_size", step_size), ("lambda_pos", lambda_pos), ("lambda_neg_end", lambda_neg_end)):
            check_number(name, value, minimum=0)
        if lambda_neg is not None:
            check_number("lambda_neg", lambda_neg, minimum=0)
        super().__init__(ctx)
        self.step_size = step_size
        self.lambda_pos = lambda_pos
        self.lambda_neg_start = 1.0 / (ctx.num_classes - 1) if lambda_neg is None else lambda_neg
        self.lambda_schedule = lambda_schedule
        self.lambda_neg_end = lambda_neg_end
        self.center, self.row_shift, self.label_sign, self.normalize = center, row_shift, label_sign, normalize
        self.lambda_neg = self.lambda_neg_start
        self.stats: Optional[ops.FBRStats] = None  # clean-set statistics of the current epoch

    def lambda_neg_at(self, epoch: int) -> float:
        if self.lambda_schedule == "constant" or self.ctx.epochs <= 1:
            return self.lambda_neg_start
        t = min(epoch / (self.ctx.epochs - 1), 1.0)
        return self.lambda_neg_start + t * (self.lambda_neg_end - self.lambda_neg_start)

    def start_epoch(self, epoch):
        self.lambda_neg = self.lambda_neg_at(epoch)
        self.stats = self.clean_statistics(epoch)

    def direction_kwargs(self):
        return dict(lambda_pos=self.lambda_pos, lambda_neg=self.lambda_neg, row_shift=self.row_shift, label_sign=self.label_sign, normalize=self.normalize)

    def end_epoch(self, epoch):
        return {"lambda_neg": self.lambda_neg}


@register
class FeatureBasedReweighting(FeatureReweightingBase):
    name = "fbr"
    supports_loss_scaling = True
    summary = "Feature-Based Reweighting: label-signed, row-shifted centred feature similarity to the clean set (Alg. 1)"
    paper = "Zhang, Holtz, Mishne, Cloninger, arXiv 2510.12209 (2025)"
    presets = {"fbr-cifar10": dict(dataset="cifar10", **PAPER_SETTING), "fbr-cifar100": dict(dataset="cifar100", **PAPER_SETTING)}

    @torch.no_grad()
    def clean_statistics(self, epoch):
        with self.ctx.ranks.whole_batch():  # every rank passes the whole trusted set
            feats, labels = split_features(self.model, self.ctx.task, "clean", self.ctx.batch_size, self.ctx.device)
        return ops.fbr_prepare(feats, labels, self.ctx.num_classes, center=self.center)

    def train_step(self, batch, clean):
        logits, feats = self.model(batch.x, return_features=True)
        losses = per_example_ce(logits, batch.y)
        direction = ops.fbr_direction(feats.detach(), batch.y, self.stats, **self.direction_kwargs())
        ops.fbr_update_(self.weights, batch.index, direction, self.step_size)
        weights = self.weights[batch.index]
        loss = weighted_update(self.ctx, self.opt, losses, weights)
        return StepOutput(loss=loss, stats={"batch_weight": weights.mean()}, logits=logits.detach())
