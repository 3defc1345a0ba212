"""FBR with neural-tangent features, `fbr-ntk` (FBR paper's "Ours (NTK)"; features per docs/method-contract.md, FBR 6).

Algorithm 1 and its closed form exactly as in `fbr` (sign fix, row shift, label sign, λ schedule,
normalisation), with the penultimate features φ(x) replaced by tangent features

    ψ(x) = ∇_{θ_S} (r · f(x))    r ∈ {-1, +1}^C a random sign vector, fixed for an epoch

over a chosen set S of layers (default: the last residual block, or in a plain conv stack the last
convolution and its BatchNorm, plus the classifier). `<ψ(x), ψ(x')>` is a one-sample unbiased
sketch of the trace of the empirical NTK restricted to S.

The closed form needs only C + 1 inner products per example: with the clean tangent mean μ, the
centred class means M_c and T = Σ_j (ψ_j - μ) (zero when centring), fbr_direction runs on the
scores `F_i = (ψ_i·M_1, ..., ψ_i·M_C, ψ_i·T)` with the projected mean `(μ·M_1, ..., μ·T)` and an
identity basis, which gives `s_ic = (ψ_i - μ)·M_c` and `T_i = (ψ_i - μ)·T` as for features.
Per batch the scores are per-example gradient / direction products of one extra backward of
`Σ_i r·f(x_i)` through S (nrcore.ops recorder and tangent_dot); once per epoch the class sums
`Σ_{j: y_j = c} ψ_j` are aggregated gradients over the trusted set (train-mode BatchNorm on
throw-away buffers, no augmentation), and `mean_j |ψ_j - μ|²` for --normalize comes from the
per-example squared norms.

BatchNorm: tangent features of a train-mode model come from the batch's joint backward through
the native BatchNorm (`joint_batchnorm_recorder`), and the loss is back-propagated exactly
through the same forward.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from nrcore import ops
from nrcore.models.functional import functional_forward, trainable_params
from nrcore.methods.families.reweighting import joint_batchnorm_recorder, per_example_ce, record_example_gradients, weighted_update
from nrcore.models.inference import split_batches
from nrcore.methods.base import Option, StepOutput, register
from nrcore.methods.fbr import FBR_OPTIONS, FeatureReweightingBase

LAYER_CHOICES = ("last-block", "classifier", "all")


def tangent_layers(model: nn.Module, which: str):
    """Names of the layers whose parameters span the tangent features (None: all of them).

    last-block: the module holding the model's last Conv2d (a residual block), or, when that
    module is a plain nn.Sequential stack, the last Conv2d and the parameterised layers after it
    there; without convolutions the last Linear before the classifier, likewise; plus the
    classifier."""
    if which == "all":
        return None
    if which == "classifier":
        return ["classifier"]
    modules = dict(model.named_modules())
    trunk = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not trunk:
        trunk = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n != "classifier"]
    if not trunk:
        return ["classifier"]
    last = trunk[-1]
    parent_name, _, child = last.rpartition(".")
    parent = modules[parent_name]
    if not isinstance(parent, nn.Sequential):
        return [parent_name, "classifier"]
    children = list(parent.named_children())
    start = [n for n, _ in children].index(child)
    block = [f"{parent_name}.{n}" if parent_name else n for n, m in children[start:] if any(True for _ in m.parameters(recurse=False))]
    return block + ["classifier"]


def _dot(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[C] -> [C, 1, ..., 1] to broadcast over a stacked [C, *shape] tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


@register
class FeatureBasedReweightingNTK(FeatureReweightingBase):
    name = "fbr-ntk"
    summary = "FBR on neural-tangent features (per-example gradients of r·f(x) over the last block + classifier)"
    paper = "Zhang, Holtz, Mishne, Cloninger, arXiv 2510.12209 (2025)"
    options = FBR_OPTIONS + (Option("ntk_layers", LAYER_CHOICES, "last-block", "layers spanning the tangent features"),)

    def __init__(self, ctx, ntk_layers, **fbr_options):
        super().__init__(ctx, **fbr_options)
        self.recorder = joint_batchnorm_recorder(self.model, tangent_layers(self.model, ntk_layers))
        self.signs = torch.ones(ctx.num_classes, device=ctx.device)
        self.directions: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _draw_signs(self, epoch: int) -> torch.Tensor:
        g = self.ctx.generator(epoch, "fbr-ntk-signs")
        return (torch.randint(0, 2, (self.ctx.num_classes,), generator=g) * 2 - 1).float().to(self.ctx.device)

    def _clean_class_sums(self):
        """Per class c: Σ_{j: y_j = c} ψ_j over the trusted set ({name: [C, *shape]}), Σ_j |ψ_j|²
        and the class counts. Train-mode BatchNorm on throw-away buffers, no augmentation."""
        C, device = self.ctx.num_classes, self.ctx.device
        named = trainable_params(self.model)
        sums, sq_norms, counts = None, torch.zeros((), dtype=torch.float64, device=device), torch.zeros(C, dtype=torch.int64, device=device)
        for batch in split_batches(self.ctx.task, "clean", self.ctx.batch_size, device):
            _, _, grads = record_example_gradients(  # C + 1 contractions: form the gradients once
                self.recorder, batch.x, lambda out: out @ self.signs, forward=lambda x: functional_forward(self.model, named, x),
                explicit=True,
            )
            part = grads.weighted_sum(F.one_hot(batch.y, C).T.to(torch.float32))
            sums = part if sums is None else {n: sums[n] + part[n] for n in sums}
            sq_norms += grads.sq_norms().double().sum()
            counts += torch.bincount(batch.y, minlength=C)
        return sums, sq_norms, counts

    def clean_statistics(self, epoch):
        """The FBR statistics of the tangent features, expressed in the (C+1)-dimensional space of
        the scores `(ψ·M_1, ..., ψ·M_C, ψ·T)` (identity basis, projected mean)."""
        self.signs = self._draw_signs(epoch)
        C = self.ctx.num_classes
        with self.ctx.ranks.whole_batch():  # every rank passes the whole trusted set
            sums, sq_norms, counts = self._clean_class_sums()
        m = int(counts.sum())
        total = {n: s.sum(0) for n, s in sums.items()}  # Σ_j ψ_j
        mean = {n: t / m if self.center else torch.zeros_like(t) for n, t in total.items()}
        per_class = counts.clamp_min(1).to(torch.float32)
        present = (counts > 0).to(torch.float32)
        class_means = {n: (s / _column(per_class, s) - mean[n]) * _column(present, s) for n, s in sums.items()}  # M_c; 0 if absent
        residual = {n: total[n] - m * mean[n] for n in total}  # T = Σ_j (ψ_j - μ): zero when centred
        self.directions = {n: torch.cat([class_means[n], residual[n][None]]) for n in sums}
        projected_mean = torch.stack([_dot(mean, {n: d[k] for n, d in self.directions.items()}) for k in range(C + 1)]).float()
        # mean_j |ψ_j - μ|² = mean_j |ψ_j|² - 2 μ·mean_j ψ_j + |μ|²
        sq_norm_mean = float(sq_norms / m - 2 * _dot(mean, total) / m + _dot(mean, mean))
        return ops.FBRStats(
            mean=projected_mean, basis_t=torch.eye(C + 1, device=self.ctx.device), counts=counts, num_classes=C, num_clean=m,
            num_present=int((counts > 0).sum()), sq_norm_mean=sq_norm_mean, center=self.center,
        )

    def train_step(self, batch, clean):
        logits, _, grads = record_example_gradients(self.recorder, batch.x, lambda out: out @ self.signs, retain_graph=True)
        scores = grads.dots(self.directions)  # [B, C+1]: ψ_i·M_c, ψ_i·T
        direction = ops.fbr_direction(scores, batch.y, self.stats, **self.direction_kwargs())
        ops.fbr_update_(self.weights, batch.index, direction, self.step_size)
        weights = self.weights[batch.index]
        loss = weighted_update(self.ctx, self.opt, per_example_ce(logits, batch.y), weights)
        return StepOutput(loss=loss, stats={"batch_weight": weights.mean()}, logits=logits.detach())
