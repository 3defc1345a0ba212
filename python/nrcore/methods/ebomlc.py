"""EBOMLC: efficient bilevel optimisation for meta label correction (Algorithm 2)."""

from __future__ import annotations

from nrcore.methods.families.label_correction import DELTA_OPTION, BarrierLabelCorrection, inner_steps_option, meta_options, paper_presets
from nrcore.methods.base import Option, register


@register
class EBOMLC(BarrierLabelCorrection):
    """EBOMLC (Nguyen & Ta, Algorithm 2): MLC-D with three changes.

    1. One-step inner update: w_(1) = w - η ∇_w G(w, α), Q = G(w, α) - G(w_(1), α).
    2. Mixture upper loss F(w, α) = -mean log(ρ softmax(f_w(x^c))[y] + (1-ρ) g_α(h(x^c), y)[y]).
    3. Alignment-aware barrier, scaled by ξ:
           β̄ = max(δ - ∇_w F·∇_w Q / ‖∇Q‖², 0),   ‖∇Q‖² = ‖∇_w Q‖² + ‖∇_α Q‖²
           w ← SGD step along ∇_w F + ξ β̄ ∇_w Q;   α ← Adam step along ∇_α F + ξ β̄ ∇_α Q

    About 3 main-model forwards (noisy at w, noisy at w_(1) without gradient, trusted at w) and
    2 backwards per step. See `BarrierLabelCorrection` for the computation, BatchNorm handling
    and logged stats."""

    name = "ebomlc"
    summary = "EBOMLC: one-step value gap, mixture upper loss, alignment-aware dynamic barrier"
    paper = "Nguyen & Ta, Efficient Bilevel Optimization for Meta Label Correction in Noisy Label Learning"
    options = (
        Option("xi", float, 0.5, "ξ: scale of the barrier term ξβ̄∇Q"),
        Option("rho", float, 0.2, "ρ: weight of the main model's probability in the mixture upper loss"),
        DELTA_OPTION,
        inner_steps_option(1),
    ) + meta_options(True)
    presets = paper_presets("ebomlc", xi=0.5, rho=0.2, delta=0.25)

    def __init__(self, ctx, xi: float, rho: float, delta: float, inner_steps: int, **meta):
        super().__init__(ctx, inner_steps=inner_steps, rho=rho, xi=xi, delta=delta, **meta)
