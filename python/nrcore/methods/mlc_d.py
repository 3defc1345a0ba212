"""MLC-D: MLC with the dynamic barrier (EBOMLC paper, Algorithm 1)."""

from __future__ import annotations

from nrcore.methods.families.label_correction import DELTA_OPTION, BarrierLabelCorrection, inner_steps_option, meta_options, paper_presets
from nrcore.methods.base import register


@register
class MetaLabelCorrectionBarrier(BarrierLabelCorrection):
    """MLC-D (Nguyen & Ta, EBOMLC paper, Algorithm 1): MLC's bilevel problem rewritten as
    min F(w) s.t. Q(w, α) = G(w, α) - G(w_k, α) <= 0 and solved with BOME's dynamic barrier,
    no hypergradient. w_k: k = 5 plain gradient steps on G(·, α) from a discarded copy of w.

        ∇_w Q = ∇_w G(w, α),   ∇_α Q = ∇_α G(w, α) - ∇_α G(w_k, α),   ∇F = (∇_w F, 0)
        β     = max((δ‖∇Q‖² - ∇_w F·∇_w Q) / ‖∇Q‖², 0)     (‖∇Q‖² over w and α)
        w     ← SGD step along ∇_w F + β ∇_w Q;   α ← Adam step along β ∇_α Q

    This is the shared barrier step with ρ = 1 (plain CE upper loss) and ξ = 1; see
    `BarrierLabelCorrection` for the computation, BatchNorm handling and logged stats."""

    name = "mlc-d"
    summary = "MLC with BOME's dynamic barrier: k-step value-function gap, no hypergradient"
    paper = "Nguyen & Ta, Efficient Bilevel Optimization for Meta Label Correction (EBOMLC paper, Alg. 1)"
    options = (
        inner_steps_option(5),
        DELTA_OPTION,
    ) + meta_options(True)
    presets = paper_presets("mlc-d")

    def __init__(self, ctx, inner_steps: int, delta: float, **meta):
        super().__init__(ctx, inner_steps=inner_steps, rho=1.0, xi=1.0, delta=delta, **meta)
