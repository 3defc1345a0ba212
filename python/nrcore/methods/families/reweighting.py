"""Pieces the reweighting methods share (`meta`, `fbr`, `fbr-ntk`, `l2rw`, `mwnet`); not a
method itself (nothing in families/ is registered). See docs/methods-reweighting.md.

* `ReweightingMethod`: one model, its SGD optimiser and a persistent per-example weight vector
  `[n_train]` in [0, 1] that the trainer logs (means, AUROC, trajectories).
* `Lookahead`: the one-step pseudo update `θ'(w) = θ - S ∇θ (1/B) Σ_i w_i l_i(θ) + c`, either
  plain SGD at the current learning rate (`S = η`, the FBR paper's Section 2 and L2RW) or the
  real optimiser's rule with momentum and weight decay (Meta-Weight-Net).
* `MetaGradient`: `∂L_val(θ'(w)) / ∂w_i` for a noisy batch, where `L_val` is the mean
  cross-entropy of a clean batch at `θ'`. `θ'` is affine in `w`, so
  `∂L_val/∂w_i = -(1/B) <∇θ l_i(θ), S ∇θ L_val(θ')>` exactly, and the modes differ only in how the
  per-example products are formed:

    tangent   one backward of the noisy batch recording each layer's inputs and output gradients
              (nrcore.ops recorder), per-example gradients contracted with the clean gradient
              through nrcore.ops.tangent_dot without forming them;
    jvp       the directional derivatives of the per-example losses along the clean gradient, one
              forward-mode pass;
    autograd  differentiate through the pseudo update (double backprop; the reference, as in the
              L2RW and MW-Net code);
    auto      tangent for models without BatchNorm, jvp for models with it.

BatchNorm. The real forward of the noisy batch is the only one that updates running
statistics, and the real step is always the exact autograd gradient of the weighted loss
through that forward; look-ahead forwards of the clean batch use batch statistics on throw-away
buffers (`functional_forward`). `jvp` and `autograd` differentiate through the batch statistics
of a train-mode BatchNorm. `tangent` takes `g_i` from the batch's joint backward through the
native BatchNorm (`joint_batchnorm_recorder`): exact per example on models without BatchNorm or
with BatchNorm in eval mode, and in train mode only a decomposition whose sum over the batch is
the exact batch gradient, which on the `cnn` loses much of the hypergradient's signal (measured
in docs/methods-reweighting.md); hence `auto`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nrcore.models.functional import FunctionalSGD, functional_forward, grads_dict, trainable_params
from nrcore.methods.base import MethodContext, Option, SingleModelMethod, backward_and_step
from nrcore.parallel import Ranks

HYPERGRAD_MODES = ("auto", "tangent", "jvp", "autograd")
HYPERGRAD_OPTION = Option(
    "hypergrad", HYPERGRAD_MODES, "auto",
    "hypergradient: per-example gradients dotted with the look-ahead clean gradient (tangent; exact without "
    "train-mode BatchNorm), the same products by forward mode (jvp; exact always), autograd through the pseudo "
    "update, or auto: tangent for models without BatchNorm, jvp for models with it",
)


def resolve_hypergrad(mode: str, model: nn.Module) -> str:
    """`auto` -> the cheapest exact way for this model: `tangent` unless it has BatchNorm layers
    (whose batch statistics couple the examples in training), then `jvp`."""
    if mode != "auto":
        return mode
    return "jvp" if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else "tangent"


def per_example_ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Cross-entropy of each example [B] (half-precision logits are upcast to float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels, reduction=reduction)


def weighted_update(ctx: Optional[MethodContext], optimizer: torch.optim.Optimizer, losses: torch.Tensor, weights: torch.Tensor, *,
                    mean: bool = True) -> torch.Tensor:
    """The real update `θ <- opt(θ, ∇θ (1/B) Σ_i w_i l_i)` by autograd (`Σ_i w_i l_i` with
    `mean=False`, for weights that already sum to one over the global batch), through the run's
    GradScaler and ranks (`MethodContext.backward_and_step`; plain without a context); returns
    this rank's loss, detached."""
    weighted = weights.detach() * losses
    loss = weighted.mean() if mean else weighted.sum()
    optimizer.zero_grad(set_to_none=True)
    if ctx is None:
        backward_and_step(loss, [optimizer])
        return loss.detach()
    ctx.backward_and_step(loss, [optimizer], local_mean=mean)
    if not mean and ctx.ranks.distributed:  # a part of a global sum, reported as a slice's mean is (the trainer weights it by the share)
        loss = loss / ctx.ranks.share
    return loss.detach()


class ReweightingMethod(SingleModelMethod):
    """Base of the reweighting family: the main model, its optimiser (the run's SGD settings,
    on the trainer's schedule) and `weights`, a persistent tensor [n_train] in [0, 1] indexed by
    `Batch.index`, saved in checkpoints and exposed through `example_weights()`."""

    needs_clean = True
    initial_weight: ClassVar[float] = 0.5

    @classmethod
    def suits_channels_last(cls, options):
        # `--hypergrad autograd` is double backprop through BatchNorm: meta 505-568 ms against 469
        # in the default layout, mwnet and l2rw about even (bench/README.md)
        return options.get("hypergrad") != "autograd"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.weights = self.track("weights", torch.full((ctx.n_train,), float(self.initial_weight), device=ctx.device))

    def example_weights(self):
        return self.weights


class Lookahead:
    """The pseudo update `θ'(w) = θ - S ⊙ g(w) + c` with `g(w) = ∇θ (1/B) Σ_i w_i l_i(θ)`.

    rule "sgd":       `θ' = θ - η g` with η the current learning rate of each parameter's group
                      (momentum and weight decay ignored): the FBR paper's Section 2, L2RW.
    rule "optimizer": the real optimiser's step (`FunctionalSGD`: momentum from its buffers,
                      dampening, Nesterov, weight decay), optimiser state untouched: MW-Net.

    Either way `θ'` is affine in `g` with a scalar slope `S_p` per parameter (`grad_scale`)."""

    RULES = ("sgd", "optimizer")

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, rule: str = "sgd"):
        if rule not in self.RULES:
            raise ValueError(f"look-ahead rule must be one of {self.RULES}, got {rule!r}")
        self.rule = rule
        self.named = trainable_params(model)
        self.sgd = FunctionalSGD(optimizer, self.named)  # also resolves each parameter's group

    def step(self, grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.rule == "optimizer":
            return self.sgd.step(dict(self.named), grads)[0]
        return {n: p - self.sgd.groups[n]["lr"] * grads[n] for n, p in self.named.items()}

    def grad_scale(self) -> Dict[str, float]:
        """`S_p = -∂θ'_p / ∂g_p` (a Python float per parameter; no device work)."""
        scales = {}
        for name, group in self.sgd.groups.items():
            lr, momentum = group["lr"], group["momentum"]
            if self.rule == "sgd" or not momentum:
                scales[name] = lr
                continue
            has_buffer = self.sgd.optimizer.state.get(self.named[name], {}).get("momentum_buffer") is not None
            slope = (1 - group["dampening"]) if has_buffer else 1.0  # first step: buf = d_p
            scales[name] = lr * (1 + momentum * slope if group["nesterov"] else slope)
        return scales


# ---- per-example gradients from one backward (nrcore.ops recorder) ---------------------------


def joint_batchnorm_recorder(model: nn.Module, layers=None):
    """The `nrcore.ops` per-sample recorder with `batchnorm="joint"`: train-mode BatchNorm keeps
    its native forward and backward, so the real step can back-propagate the recorded forward
    exactly, and the recorded `g_i` are the examples' slices of the batch's joint backward (their
    products sum to the exact batch gradient).

    Why not the recorder's default (batch statistics held constant while recording): training
    through that graph loses the part of the gradient BatchNorm normalises away; on digits `meta`
    fell to 11% test accuracy after one epoch, against 84% with exact gradients."""
    from nrcore.ops import PerSampleGradRecorder

    return PerSampleGradRecorder(model, layers, batchnorm="joint")


PER_EXAMPLE_BUDGET_BYTES = 256 << 20  # explicit per-example gradients of one batch kept at most


class ExampleGradients:
    """Per-example gradients `G_i = ∇θ l_i` of one recorded forward/backward (through
    `nrcore.ops.PerSampleGradRecorder`), contracted as often as a step needs:
    `dots(directions) -> [B, k]` (`<G_i, D_k>`) and `weighted_sum(w) -> Σ_i w_i G_i`.

    By default each contraction goes through the recorder (`nrcore.ops.tangent_dot`, per-layer
    weight gradients) without forming the per-example gradients. With `explicit=True` (and when
    they fit in PER_EXAMPLE_BUDGET_BYTES) they are formed once and every contraction is one matrix
    product: worth it only for many contractions of one recording (FBR-NTK's clean statistics: C
    weighted sums and the norms, 190 against 290 ms per epoch on mnist10k). For the one or two of
    a training step (fbr-ntk's scores; meta's pseudo update and hypergradient) the compiled
    contractions are faster: fbr-ntk 86 against 115-134 ms per step, meta with `tangent` 239
    against 256 ms (bench/methods.py on mnist10k, `cnn`, one thread; bench/README.md)."""

    def __init__(self, recorder, batch: int, *, explicit: bool = False):
        self.recorder = recorder
        numel = sum(p.numel() for p in recorder.parameters.values())
        element = next(iter(recorder.parameters.values())).element_size()
        self.explicit = None
        if explicit and batch * numel * element <= PER_EXAMPLE_BUDGET_BYTES:
            self.explicit = {n: g.reshape(batch, -1) for n, g in recorder.per_sample_grads().items()}

    def dots(self, directions: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, k]: `<G_i, D_k>` for k directions stacked per parameter name ([k, *shape])."""
        if self.explicit is None:
            return self.recorder.dot_many(directions)
        out = None
        for name, grads in self.explicit.items():
            part = grads @ directions[name].reshape(directions[name].shape[0], -1).to(grads.dtype).T
            out = part if out is None else out + part
        return out

    def weighted_sum(self, weights: torch.Tensor) -> Dict[str, torch.Tensor]:
        """`Σ_i w_i G_i` per parameter name; `weights` [B], or [k, B] for k sums at once
        (then each value is [k, *shape])."""
        if self.explicit is None:
            if weights.dim() == 1:
                return self.recorder.weighted_sum(weights)
            sums = [self.recorder.weighted_sum(row) for row in weights]
            return {n: torch.stack([s[n] for s in sums]) for n in sums[0]}
        lead = weights.shape[:-1]
        return {n: (weights.to(g.dtype) @ g).view(*lead, *self.recorder.parameters[n].shape) for n, g in self.explicit.items()}

    def sq_norms(self) -> torch.Tensor:
        """[B]: `|G_i|²`."""
        if self.explicit is None:
            return self.recorder.kernel().diagonal()
        return sum(g.pow(2).sum(1) for g in self.explicit.values())


def record_example_gradients(recorder, x: torch.Tensor, values_fn, *, forward=None, retain_graph: bool = False,
                             explicit: bool = False) -> tuple:
    """Run `out = forward(x)` (default: the recorder's model) and one backward of
    `values_fn(out).sum()` under `recorder`, where `values_fn` gives one value per example (its
    loss, or `r·f(x)` for tangent features), so `G_i = ∇θ values_i`; returns (out, values,
    ExampleGradients(explicit=explicit)). `retain_graph` keeps the graph for a later backward of
    `out`. The backward asks for the gradient at each recorded layer's input (at its weights only
    where the input is data), so no other weight gradient is computed."""
    targets = []
    recorded = {id(p) for p in recorder.parameters.values()}

    def note_input(module, inputs):
        if inputs[0].requires_grad:
            targets.append(inputs[0])
        else:
            targets.extend(p for p in module.parameters(recurse=False) if id(p) in recorded)

    model = recorder.model
    hooks = [m.register_forward_pre_hook(note_input) for m in model.modules() if any(id(p) in recorded for p in m.parameters(recurse=False))]
    try:
        with recorder.record():
            out = (forward or model)(x)
            values = values_fn(out)
            torch.autograd.grad(values.sum(), targets, retain_graph=retain_graph, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return out, values, ExampleGradients(recorder, x.shape[0], explicit=explicit)


def loss_derivatives_along(model: nn.Module, x: torch.Tensor, y: torch.Tensor, direction: Dict[str, torch.Tensor]) -> torch.Tensor:
    """`<∇θ l_i(θ), D>` for every example as one forward-mode pass (`torch.func.jvp`): the
    directional derivative of the per-example losses, exact also through train-mode BatchNorm
    (whose batch statistics move with θ; throw-away buffers, running statistics untouched)."""
    params = {n: p.detach() for n, p in trainable_params(model).items()}
    with torch.autocast(x.device.type, enabled=False):  # forward-mode AD does not compose with autocast: this pass stays float32
        _, out = torch.func.jvp(lambda p: per_example_ce(functional_forward(model, p, x), y), (params,), ({n: direction[n] for n in params},))
    return out


# ---- the hypergradient of a one-step look-ahead ---------------------------------------------


@dataclass
class NoisyForward:
    """The real (train-mode) forward of a noisy batch: per-example losses with their graph and,
    on the tangent path, their per-example gradients."""

    x: torch.Tensor
    y: torch.Tensor
    losses: torch.Tensor
    example_grads: Optional[ExampleGradients] = None
    logits: Optional[torch.Tensor] = None  # detached, for the audit's training dynamics
    total: int = 0  # the global batch's size B (under torchrun this is a rank's slice of it)


class MetaGradient:
    """`∂L_val(θ'(w)) / ∂w_i` of a one-step look-ahead, and the real step after it (see the
    module docstring). Per training step:

        fwd = mg.forward(x, y, total)                     # the real forward (BN running stats: once)
        h, val_loss = mg.hypergradient(fwd, w, xv, yv)
        loss = mg.step(fwd, new_w)                        # θ <- opt(θ, ∇θ (1/B) Σ_i new_w_i l_i)

    On the tangent path the pseudo update and the per-example dots contract the same per-example
    gradients of one backward of the noisy batch; the real step back-propagates that forward
    again (exactly, with the new weights).

    Under torchrun (`ctx.ranks`) `x` is a rank's slice of a global batch of `total` examples:
    the pseudo update's gradient is summed over the ranks (so θ' is the whole batch's), the
    clean batch is the same on every rank (so is ∇L_val(θ')), and the per-example products are
    each rank's own; `autograd` (double backprop through the sum over ranks) is single-process."""

    explicit_example_grads = False  # form them for the two contractions? slower (ExampleGradients)

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, *, rule: str = "sgd", mode: str = "auto",
                 ctx: Optional[MethodContext] = None):
        if mode not in HYPERGRAD_MODES:
            raise ValueError(f"hypergradient mode must be one of {HYPERGRAD_MODES}, got {mode!r}")
        self.model = model
        self.optimizer = optimizer
        self.ctx = ctx
        self.ranks = ctx.ranks if ctx is not None else Ranks()
        if mode == "autograd" and self.ranks.distributed:
            raise ValueError("--hypergrad autograd differentiates through the pseudo update twice, which nrcore does not do "
                             "across processes: use --hypergrad jvp or tangent under torchrun")
        self.lookahead = Lookahead(model, optimizer, rule)
        self.mode = mode = resolve_hypergrad(mode, model)
        # every trainable parameter, or it raises
        self.recorder = joint_batchnorm_recorder(model) if mode == "tangent" else None

    def forward(self, x: torch.Tensor, y: torch.Tensor, total: Optional[int] = None) -> NoisyForward:
        """The real forward of the noisy batch `x`, a slice of a global batch of `total` (default:
        `x` is the whole batch)."""
        total = x.shape[0] if total is None else total
        if self.recorder is None:
            logits = self.model(x)
            return NoisyForward(x, y, per_example_ce(logits, y), logits=logits.detach(), total=total)
        logits, losses, grads = record_example_gradients(self.recorder, x, lambda out: per_example_ce(out, y), retain_graph=True,
                                                         explicit=self.explicit_example_grads)
        return NoisyForward(x, y, losses, grads, logits=logits.detach(), total=total)

    def hypergradient(self, fwd: NoisyForward, weights: torch.Tensor, clean_x: torch.Tensor, clean_y: torch.Tensor, *, at_zero: bool = False):
        """(∂L_val/∂w [B], clean loss at θ' (detached)). `at_zero`: the weights are all zero, so
        with the plain-SGD rule θ' = θ and no pseudo update is formed (L2RW)."""
        if self.mode == "autograd":
            return self._autograd(fwd, weights, clean_x, clean_y)
        batch = fwd.total
        if at_zero and self.lookahead.rule == "sgd":
            shifted = {n: p.detach().requires_grad_() for n, p in self.lookahead.named.items()}
        else:
            if fwd.example_grads is not None:
                pseudo = fwd.example_grads.weighted_sum(weights.detach() / batch)
            else:
                local = self.ranks.scale_local((weights.detach() * fwd.losses).mean())
                pseudo = grads_dict(local, self.lookahead.named, retain_graph=True)
            self.ranks.sum_(list(pseudo.values()))  # the whole batch's pseudo update
            shifted = {n: p.detach().requires_grad_() for n, p in self.lookahead.step(pseudo).items()}
        with self.ranks.whole_batch():  # the trusted batch: whole on every rank
            val_loss = per_example_ce(functional_forward(self.model, shifted, clean_x), clean_y, "mean")
        val_grad = grads_dict(val_loss, shifted)
        self.ranks.agree_(list(val_grad.values()))
        scale = self.lookahead.grad_scale()
        direction = {n: scale[n] * val_grad[n] for n in val_grad}
        if fwd.example_grads is not None:
            dots = fwd.example_grads.dots({n: d[None] for n, d in direction.items()})[:, 0]
        else:
            dots = loss_derivatives_along(self.model, fwd.x, fwd.y, direction)
        return dots / -batch, val_loss.detach()

    def _autograd(self, fwd: NoisyForward, weights, clean_x, clean_y):
        w = weights.detach().clone().requires_grad_(True)
        inner = (w * fwd.losses).mean()
        grads = grads_dict(inner, self.lookahead.named, create_graph=True)
        shifted = self.lookahead.step(grads)
        val_loss = per_example_ce(functional_forward(self.model, shifted, clean_x), clean_y, "mean")
        (hypergrad,) = torch.autograd.grad(val_loss, w, retain_graph=True)  # keep the noisy graph for the real step
        return hypergrad, val_loss.detach()

    def step(self, fwd: NoisyForward, weights: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """The real update `θ <- opt(θ, ∇θ (1/B) Σ_i w_i l_i)` through the noisy forward's graph
        (`Σ_i w_i l_i` with `mean=False`, for weights that already sum to one)."""
        return weighted_update(self.ctx, self.optimizer, fwd.losses, weights, mean=mean)
