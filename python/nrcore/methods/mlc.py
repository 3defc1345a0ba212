"""MLC: Meta Label Correction with an exact k-step look-ahead hypergradient."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from nrcore.models.functional import FunctionalSGD, functional_forward, grads_dict
from nrcore.methods.families.label_correction import (
    LabelCorrectionMethod,
    check_inner_steps,
    grads_finite,
    inner_steps_option,
    meta_options,
    paper_presets,
    soft_cross_entropy,
)
from nrcore.data.types import Batch
from nrcore.methods.base import Option, StepOutput, register


@register
class MetaLabelCorrection(LabelCorrectionMethod):
    """MLC (Zheng et al., AAAI 2021). A meta model g_α corrects each noisy label; α follows the
    exact hypergradient of the trusted loss through k unrolled training steps of the main model.

    One step, with noisy batch (x', ỹ), trusted batch (x^c, y^c), t = g_α(h(x'), ỹ):

        G(w, α)  = mean_i CE(f_w(x'_i), t_i)                      real forward at w
        w_1      = SGD(w, ∇_w G(w, α)),  w_(i+1) = SGD(w_i, ∇_w G(w_i, α))   (k steps, graph kept)
        F(w_k)   = mean_j CE(f_(w_k)(x^c_j), y^c_j)
        α        ← Adam step along ∇_α F(w_k(α))                  exact, by double backprop
        w        ← SGD step along ∇_w G(w, α_t)                   the gradient of the first line

    `SGD(·)` is the main optimiser's own rule (learning rate, momentum from its buffers, weight
    decay, as in the reference code) applied functionally: the real buffers are not touched.
    The look-ahead steps reuse the same noisy batch and corrected labels. As in the reference
    code, the real update of w uses the corrected labels of α_t (the meta and main updates are
    simultaneous), which needs no extra forward.

    --mix-clean (the reference code's default `hmlc_K_mix`; off here, as the method contract and paper
    state G): the trusted batch is split in halves; the second joins G with its labels,
    G = (B·G_noisy + b·CE(f_w(x^c_2), y^c_2)) / (B + b), in the look-ahead and the real step, and
    F uses the first half only.

    BatchNorm: only the forwards at w (the noisy batch, and the trusted half with --mix-clean:
    the real update's forwards) update the running statistics; the look-ahead forwards at
    w_1..w_(k-1) and the trusted forward at w_k use batch statistics without updating them.
    Non-finite gradients skip the step (counted in `skipped`).

    Per-step stats: upper_loss (F(w_k)), hypergrad_sq (‖∇_α F‖²), skipped. The loss is G(w, α)."""

    name = "mlc"
    summary = "meta label correction: meta model trained by the exact k-step look-ahead hypergradient"
    paper = "Zheng, Awadallah & Dumais, Meta Label Correction for Noisy Label Learning, AAAI 2021"
    options = (
        inner_steps_option(1),
        Option(
            "mix_clean", bool, False,
            "the reference code's default (hmlc_K_mix): half of each trusted batch joins the lower loss with its labels, the other half is the meta batch",
        ),
    ) + meta_options(False)
    presets = paper_presets("mlc")

    @classmethod
    def suits_channels_last(cls, options):
        # its step is double backprop through BatchNorm: 440-470 ms against 366-392 in the default
        # layout (mnist10k, cnn, one thread; bench/README.md)
        return False

    def __init__(self, ctx, inner_steps: int, mix_clean: bool, **meta):
        check_inner_steps(inner_steps)
        super().__init__(ctx, **meta)
        self.inner_steps = inner_steps
        self.mix_clean = mix_clean
        self.lookahead_sgd = FunctionalSGD(self.opt, self.named)

    def train_step(self, batch, clean):
        self.stepper.begin()
        lower, grads, upper, hypergrad, logits = self.gradients(batch, clean)
        # Under torchrun each rank unrolls the look-ahead on its own slice (a differentiable sum
        # over the ranks inside the unrolled graph is not done): the main gradient is the whole
        # batch's, the hypergradient the slices' weighted mean (data-parallel, not the
        # single-process step).
        ranks = self.ctx.ranks
        if ranks.distributed:
            grads = [g.detach() * ranks.share for g in grads]
            hypergrad = [g * ranks.share for g in hypergrad]
            ranks.sum_(grads + hypergrad)
        ok = grads_finite(grads) & grads_finite(hypergrad)
        if self.stepper.known_bad(ok):
            self.stepper.undo()
        else:
            for p, g in zip(self.params, grads):
                p.grad = g.detach()
            for p, g in zip(self.meta_params, hypergrad):
                p.grad = g
            self.stepper.step(ok)
        hypergrad_sq = torch.stack(torch._foreach_norm(list(hypergrad))).square().sum()
        stats = {"upper_loss": upper.detach(), "hypergrad_sq": hypergrad_sq, "skipped": (~ok).float()}
        return StepOutput(loss=lower.detach(), stats=stats, logits=logits)

    def gradients(self, batch, clean):
        """(G(w, α), ∇_w G(w, α), F(w_k), ∇_α F(w_k(α)), the noisy batch's logits at w) for one
        step; updates BN running statistics through the real forward(s) at w only."""
        meta_batch, mixed = clean, None
        if self.mix_clean:
            half = len(clean) // 2
            if half == 0:
                raise ValueError("--mix-clean needs trusted batches of at least 2 examples")
            meta_batch = Batch(clean.x[:half], clean.y[:half], clean.index[:half])
            mixed = Batch(clean.x[half:], clean.y[half:], clean.index[half:])

        logits, feats = self.model(batch.x, return_features=True)  # the real forward(s)
        targets = self.meta.probs(feats.detach(), batch.y)
        lower = self._lower_loss(logits, targets, mixed, self.model)
        grads = torch.autograd.grad(lower, self.params, create_graph=True)

        params, buffers = self.lookahead_sgd.step(self.named, dict(zip(self.named, grads)))
        for _ in range(self.inner_steps - 1):
            forward = partial(functional_forward, self.model, params)
            step_loss = self._lower_loss(forward(batch.x), targets, mixed, forward)
            params, buffers = self.lookahead_sgd.step(params, grads_dict(step_loss, params, create_graph=True), buffers)
        with self.ctx.ranks.whole_batch():  # the trusted batch: whole on every rank
            upper = F.cross_entropy(functional_forward(self.model, params, meta_batch.x), meta_batch.y)
        hypergrad = torch.autograd.grad(upper, self.meta_params)
        return lower, grads, upper, hypergrad, logits.detach()

    @staticmethod
    def _lower_loss(logits, targets, mixed, forward):
        """G on the noisy batch; with --mix-clean, the per-example average with the CE of the
        trusted half `mixed` (run through `forward`)."""
        loss = soft_cross_entropy(logits, targets)
        if mixed is None:
            return loss
        n, m = len(logits), len(mixed)
        return (n * loss + m * F.cross_entropy(forward(mixed.x), mixed.y)) / (n + m)
