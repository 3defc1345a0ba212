"""What the label-correction family (`mlc`, `mlc-d`, `ebomlc`) shares: the meta model g_α, the
lower and upper losses, exactly skippable optimiser steps, and the common method skeleton
(models, optimisers, checkpointed state, the corrected-label confusion matrix artifact).

Notation (docs/method-contract.md, EBOMLC paper): f_w the main model, h(x) its penultimate features, g_α(h, ỹ)
the meta model's corrected label distribution for an example with noisy label ỹ.

    lower loss  G(w, α) = mean_i CE(f_w(x'_i), g_α(h(x'_i), ỹ_i))          (soft targets)
    upper loss  F(w)    = mean_j CE(f_w(x^c_j), y^c_j)                       (MLC, MLC-D)
    mixture     F(w, α) = -mean_j log(ρ softmax(f_w(x^c_j))[y_j] + (1-ρ) g_α(h(x^c_j), y_j)[y_j])  (EBOMLC)

Within one training step h(x') is the main model's feature at the step's starting point w_t,
detached: the meta model sees the features as a fixed extractor (MLC: "h is frozen"), and every
look-ahead of that step reuses the same corrected labels g_α(h_t(x'), ỹ).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nrcore.models.functional import functional_forward, trainable_params
from nrcore.methods.base import ExampleSignal, Method, Option, StepOutput

ARTIFACT = "label_correction.npz"

def meta_options(meta_schedule: bool):
    """The meta-model options every label-correction method has (the papers' defaults)."""
    return (
        Option("meta_lr", float, 3e-4, "Adam learning rate of the meta model g_α"),
        Option("meta_schedule", bool, meta_schedule, "scale the meta lr by the run's lr schedule too (decay at the milestones)"),
        Option("meta_hidden", int, 128, "hidden width of the meta model's three-layer MLP"),
        Option("label_dim", int, 128, "size of the meta model's noisy-label embedding (C x label_dim)"),
    )


def inner_steps_option(default: int) -> Option:
    return Option(
        "inner_steps", int, default,
        "look-ahead steps k on the noisy batch (mlc: unrolled for the hypergradient; mlc-d, ebomlc: plain steps of a discarded copy)",
    )


def check_inner_steps(inner_steps: int) -> None:
    if inner_steps < 1:
        raise ValueError(f"--inner-steps must be >= 1, got {inner_steps}")


DELTA_OPTION = Option("delta", float, 0.25, "barrier strength δ: β = max(δ - ∇_w F·∇_w Q / ‖∇Q‖², 0)")


def paper_presets(method: str, **options) -> Dict[str, Dict]:
    """`<method>-cifar10` and `<method>-cifar100`: the MLC/EBOMLC protocol (ResNet-32, 120 epochs,
    SGD 0.1 momentum 0.9 wd 5e-4, x0.1 at epochs 80 and 100, batch 100, meta Adam 3e-4, 2%
    trusted), plus the method's own `options`."""
    common = dict(
        model="resnet32", epochs=120, batch_size=100, lr=0.1, momentum=0.9, weight_decay=5e-4,
        schedule="multistep", milestones=[80, 100], gamma=0.1, clean_frac=0.02, meta_lr=3e-4, **options,
    )
    return {f"{method}-{dataset}": dict(dataset=dataset, **common) for dataset in ("cifar10", "cifar100")}


class MetaLabelCorrector(nn.Module):
    """g_α(h, ỹ): a label embedding (C x label_dim) concatenated to the features, then
    Linear-tanh-Linear-tanh-Linear to C logits. `forward` returns the logits; the corrected label
    is their softmax (`probs`)."""

    def __init__(self, feature_dim: int, num_classes: int, hidden: int = 128, label_dim: int = 128):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, label_dim)
        self.net = nn.Sequential(
            nn.Linear(feature_dim + label_dim, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, num_classes),
        )
        nn.init.xavier_uniform_(self.label_embedding.weight)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([feats, self.label_embedding(labels)], dim=1))

    def probs(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self(feats, labels).softmax(dim=1)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """mean_i -Σ_c t_ic log softmax(logits_i)_c."""
    return -(target_probs * logits.log_softmax(dim=1)).sum(dim=1).mean()


def mixture_nll(logits: torch.Tensor, meta_logits: torch.Tensor, labels: torch.Tensor, rho: float) -> torch.Tensor:
    """EBOMLC's upper loss: -mean log(ρ p_f[y] + (1-ρ) p_g[y]), mixing probabilities (not
    logits), computed in log space for stability."""
    log_f = logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    log_g = meta_logits.log_softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.logaddexp(log_f + math.log(rho), log_g + math.log1p(-rho)).mean()


# ---- exactly skippable optimiser steps ---------------------------------------------------------
def materialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimiser's per-parameter state now, as its first step would (zeros), so the
    set of state tensors is fixed and `SkippableStep` can snapshot it. Equivalent to the lazy
    initialisation: an SGD momentum buffer of zeros gives buf = d_p on the first step (dampening
    0), and Adam from step 0 with zero moments is a fresh Adam."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if isinstance(optimizer, torch.optim.SGD):
                if group["momentum"]:
                    if group["dampening"]:
                        raise ValueError("skippable SGD steps need dampening=0")
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif isinstance(optimizer, torch.optim.Adam):
                on_device = group["capturable"] or group["fused"]
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                raise TypeError(f"no state layout known for {type(optimizer).__name__}")


class SkippableStep:
    """Optimiser steps that become exact no-ops when a step's gradients are not finite.

    `begin()` at the start of a training step snapshots the modules' buffers (the step's
    forwards move BatchNorm running statistics). Then either `known_bad(ok)` is True and the
    method calls `undo()` instead of stepping, or it calls `step(ok)`:

    - where `ok` (0-d bool tensor) can be read for free (the CPU), a bad step is known before it
      is taken, and only the buffers need putting back;
    - on an accelerator, reading `ok` would be a host sync, so the parameters and optimiser
      state are snapshotted too, every optimiser steps, and `torch.where(ok, new, old)` puts the
      snapshot back on the device.

    Either way a skipped step leaves parameters, buffers and optimiser state (momentum, Adam
    moments and step count) exactly as they were. `read_ok` forces one strategy (tests)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], modules: Sequence[nn.Module] = (), read_ok=None):
        self.optimizers = tuple(optimizers)
        self.modules = tuple(modules)
        self.read_ok = read_ok
        for opt in self.optimizers:
            materialise_state(opt)
        self._saved = None

    def _reads_ok(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.read_ok is None else self.read_ok  # MethodContext.host_reads_free

    def _state_tensors(self) -> List[torch.Tensor]:
        # re-read each time: load_state_dict replaces the state tensors
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    out.append(p)
                    out.extend(v for v in opt.state[p].values() if isinstance(v, torch.Tensor))
        return out

    @torch.no_grad()
    def begin(self) -> None:
        tensors = [b for m in self.modules for b in m.buffers()]
        device = self.optimizers[0].param_groups[0]["params"][0].device
        if not self._reads_ok(device):
            tensors += self._state_tensors()
        self._saved = [(t, t.clone()) for t in tensors]

    def known_bad(self, ok: torch.Tensor) -> bool:
        """True when `ok` is False and reading it costs no sync: then call `undo()`."""
        return self._reads_ok(ok.device) and not bool(ok)

    @torch.no_grad()
    def undo(self) -> None:
        for t, saved in self._take():
            t.copy_(saved)

    @torch.no_grad()
    def step(self, ok: torch.Tensor) -> None:
        saved = self._take()
        if self._reads_ok(ok.device):
            if not bool(ok):
                raise RuntimeError("SkippableStep.step() on a known bad step: call undo()")
            for opt in self.optimizers:
                opt.step()
            return
        for opt in self.optimizers:
            opt.step()
        for t, old in saved:
            t.copy_(torch.where(ok.to(t.device), t, old))

    def _take(self):
        if self._saved is None:
            raise RuntimeError("SkippableStep: begin() was not called for this step")
        saved, self._saved = self._saved, None
        return saved


def grads_finite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d bool: every gradient is finite (a NaN/Inf anywhere makes its norm non-finite)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(list(grads)))).all()


def set_grad_buffers(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Allocate `.grad` once for each parameter (methods write their directions into them)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


# ---- the method skeleton ---------------------------------------------------------------------
class LabelCorrectionMethod(Method):
    """Main model f_w (SGD from the run's settings), meta model g_α (Adam) and what the three
    methods share. Subclasses implement `train_step`.

    Artifact: `label_correction.npz` (at the end of a run) with
      confusion        int64 [C, C]: rows = true label, columns = argmax of the corrected label
                       g_α(h(x), ỹ) over the whole training set (eval-mode features)
      noisy_confusion  int64 [C, C]: rows = true label, columns = the noisy label ỹ
    Examples whose true label is unknown (-1) are left out of both."""

    needs_clean = True

    def __init__(self, ctx, meta_lr: float, meta_schedule: bool, meta_hidden: int, label_dim: int):
        for name, value in (("meta_lr", meta_lr), ("meta_hidden", meta_hidden), ("label_dim", label_dim)):
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        super().__init__(ctx)
        self.meta_schedule = meta_schedule
        self.model = self.track("model", ctx.build_model())
        self.meta = self.track(
            "meta_model", MetaLabelCorrector(self.model.feature_dim, ctx.num_classes, meta_hidden, label_dim).to(ctx.device)
        )
        self.opt = self.track("optimizer", ctx.make_optimizer(self.model.parameters()))
        # capturable keeps Adam's step count on the GPU, so SkippableStep never syncs
        self.meta_opt = self.track(
            "meta_optimizer", torch.optim.Adam(self.meta.parameters(), lr=meta_lr, capturable=ctx.device.type == "cuda")
        )
        self.named = trainable_params(self.model)
        self.params = list(self.named.values())
        self.meta_params = list(self.meta.parameters())
        self.stepper = SkippableStep([self.opt, self.meta_opt], [self.model], read_ok=ctx.host_reads_free)

    def scheduled_optimizers(self):
        return [self.opt, self.meta_opt] if self.meta_schedule else [self.opt]

    def eval_model(self):
        return self.model

    def lookahead_lr(self) -> float:
        """η_w: the main optimiser's current (scheduled) learning rate."""
        return self.opt.param_groups[0]["lr"]

    @torch.no_grad()
    def corrected_distribution(self, batch_size: int = 1000) -> torch.Tensor:
        """g_α(h(x), ỹ) [n, C] of every training example at the end of the run: the meta
        model's corrected label distribution, on the main model's features in eval mode."""
        task = self.ctx.task
        out = torch.full((len(task.train), self.ctx.num_classes), float("nan"), device=self.ctx.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in task.loader("train", batch_size, device=self.ctx.device):
                _, feats = self.model(batch.x, return_features=True)
                out[batch.index] = self.meta.probs(feats, batch.y).float()
        finally:
            self.model.train(was_training)
        if bool(out.isnan().any()):
            raise RuntimeError("the training loader did not visit every example, or the meta model gave NaN")
        return out

    def final_distribution(self) -> torch.Tensor:
        """`corrected_distribution()` once the run is over, computed once for the confusion
        matrices and the audit signal both."""
        if getattr(self, "_final_distribution", None) is None:
            self._final_distribution = self.corrected_distribution()
        return self._final_distribution

    def audit_signals(self):
        probs = self.final_distribution().double()
        given = probs.gather(1, self.ctx.task.train.labels.to(probs.device)[:, None])[:, 0]
        return {"corrected_label": ExampleSignal(1 - given, probs.argmax(dim=1), "the meta model's corrected label distribution g(h(x), y) at the end; score = 1 - g[given label]")}

    audit_default = "corrected_label"

    def corrected_label_confusion(self) -> Dict[str, np.ndarray]:
        task, C = self.ctx.task, self.ctx.num_classes
        true = task.train.true_labels.cpu()
        noisy = task.train.labels.cpu()
        corrected = self.final_distribution().argmax(dim=1).cpu()
        known = true >= 0

        def confusion(cols):
            flat = true[known] * C + cols[known]
            return torch.bincount(flat, minlength=C * C).reshape(C, C).numpy().astype(np.int64)

        return {"confusion": confusion(corrected), "noisy_confusion": confusion(noisy)}

    def save_artifacts(self, run_dir: Path) -> None:
        from nrcore.atomic import atomic_write_bytes

        arrays = self.corrected_label_confusion()
        atomic_write_bytes(Path(run_dir) / ARTIFACT, lambda f: np.savez(f, **arrays))


# ---- MLC-D and EBOMLC ---------------------------------------------------------------------------
class BarrierLabelCorrection(LabelCorrectionMethod):
    """The value-function reformulation of MLC solved with a dynamic barrier (BOME), shared by
    MLC-D (k = 5, ρ = 1, ξ = 1) and EBOMLC (k = 1, ρ = 0.2, ξ = 0.5). One step, with noisy batch
    (x', ỹ), trusted batch (x^c, y^c) and η the main optimiser's current learning rate:

        t      = g_α(h(x'), ỹ)                                   corrected labels
        ∇_w Q  = ∇_w G(w, α)                                     real forward at w
        w_1    = w - η ∇_w G(w, α);  w_(i+1) = w_i - η ∇_w G(w_i, α)   look-ahead on a copy (k steps)
        ∇_α Q  = ∇_α [G(w, α) - G(w_k, α)] = ∇_α mean_i -Σ_c t_ic (log p_w - log p_wk)_ic
        F      = mixture upper loss with ρ (ρ = 1: plain CE on the trusted batch, ∇_α F = 0)
        β̄      = max(δ - ∇_w F·∇_w Q / (‖∇_w Q‖² + ‖∇_α Q‖²), 0)    (0 when the denominator is 0)
        w      ← SGD step along ∇_w F + ξ β̄ ∇_w Q     (the run's momentum and weight decay)
        α      ← Adam step along ∇_α F + ξ β̄ ∇_α Q

    The look-ahead steps are plain gradient steps (Algorithms 1 and 2), on the same noisy batch
    with the same corrected labels; w_k is discarded. Cost: forwards at w (noisy, trusted) with
    backwards, k-1 look-ahead forward/backward pairs and one gradient-free forward at w_k.

    BatchNorm: the two forwards at w (noisy and trusted batch) are the real update's forwards
    and update the running statistics; the look-ahead forwards (at w_1..w_k) use batch
    statistics but never touch the running ones. A step with any non-finite gradient is skipped
    (parameters, BN statistics and optimiser state unchanged) and counted in `skipped`; its
    loss is still reported, so a non-finite loss stops the run as the trainer's rule says.

    Per-step stats (epoch means in metrics.jsonl): beta (β̄, before ξ), grad_q_sq (‖∇Q‖²),
    upper_loss (F), skipped (fraction of skipped steps). The step's loss is G(w, α)."""

    def __init__(self, ctx, *, inner_steps: int, rho: float, xi: float, delta: float, **meta):
        check_inner_steps(inner_steps)
        if not 0 < rho <= 1:
            raise ValueError(f"--rho must be in (0, 1], got {rho}")
        if not xi > 0 or not delta > 0:
            raise ValueError(f"--xi and --delta must be > 0, got {xi} and {delta}")
        super().__init__(ctx, **meta)
        self.inner_steps, self.rho, self.xi, self.delta = inner_steps, rho, xi, delta
        self.ops = _barrier_ops()
        self.grad_buffers = set_grad_buffers(self.params)
        self.meta_grad_buffers = set_grad_buffers(self.meta_params)

    def train_step(self, batch, clean):
        self.stepper.begin()
        lr = self.lookahead_lr()
        # lower loss at w: the real forward; ∇_w Q = ∇_w G(w, α)
        logits, feats = self.model(batch.x, return_features=True)
        targets = self.meta.probs(feats.detach(), batch.y)
        log_p = logits.log_softmax(dim=1)
        lower = -(targets.detach() * log_p).sum(dim=1).mean()
        ranks = self.ctx.ranks  # under torchrun: the noisy batch's gradients summed over the slices
        grads_q_w = ranks.grad(lower, self.params)

        log_p_k = self._lookahead_log_probs(batch.x, grads_q_w, targets.detach(), lr)
        value_gap = -(targets * (log_p.detach() - log_p_k)).sum(dim=1).mean()
        grads_q_alpha = ranks.grad(value_gap, self.meta_params)

        # upper loss at w: the other real forward, on the trusted batch every rank has whole
        with ranks.whole_batch():
            logits_c, feats_c = self.model(clean.x, return_features=True)
        if self.rho < 1:
            upper = mixture_nll(logits_c, self.meta(feats_c.detach(), clean.y), clean.y, self.rho)
            grads = torch.autograd.grad(upper, self.params + self.meta_params)
            grads_f_w, grads_f_alpha = grads[: len(self.params)], grads[len(self.params):]
        else:
            upper = F.cross_entropy(logits_c, clean.y)
            grads_f_w, grads_f_alpha = torch.autograd.grad(upper, self.params), None

        ranks.agree_(list(grads_f_w) + list(grads_f_alpha or ()))
        stats = self.ops.barrier_stats(list(grads_f_w), list(grads_q_w), list(grads_q_alpha))
        beta = self.ops.barrier_coefficient(stats, self.delta)
        ok = stats[3] == 0
        if grads_f_alpha is not None:
            ok = ok & grads_finite(grads_f_alpha)
        if self.stepper.known_bad(ok):
            self.stepper.undo()
        else:
            coef = self.xi * beta
            skip = ~ok  # read on the device: a bad step leaves the buffers alone (the stepper undoes it)
            self.ops.barrier_combine_(self.grad_buffers, list(grads_f_w), list(grads_q_w), coef, skip_if=skip)
            f_alpha = None if grads_f_alpha is None else list(grads_f_alpha)  # None: MLC-D's β ∇_α Q
            self.ops.barrier_combine_(self.meta_grad_buffers, f_alpha, list(grads_q_alpha), coef, skip_if=skip)
            self.stepper.step(ok)
        stats_out = {
            "beta": beta.detach(),
            "grad_q_sq": (stats[1] + stats[2]).detach(),
            "upper_loss": upper.detach(),
            "skipped": (~ok).float(),
        }
        return StepOutput(loss=lower.detach(), stats=stats_out, logits=logits.detach())

    def _lookahead_log_probs(self, x, grads, targets, lr) -> torch.Tensor:
        """log softmax f_(w_k)(x') after k plain gradient steps on G(·, α) from w, the first
        along the given ∇_w G(w, α); no BatchNorm running-stat updates, no graph kept."""
        names = list(self.named)
        with torch.no_grad():
            w = torch._foreach_add([p.detach() for p in self.params], list(grads), alpha=-lr)
        for _ in range(self.inner_steps - 1):
            w = [t.requires_grad_() for t in w]
            logits = functional_forward(self.model, dict(zip(names, w)), x)
            step = self.ctx.ranks.grad(soft_cross_entropy(logits, targets), w)
            with torch.no_grad():
                w = torch._foreach_add(w, list(step), alpha=-lr)
        with torch.no_grad():
            return functional_forward(self.model, dict(zip(names, w)), x).log_softmax(dim=1)


def _barrier_ops():
    """nrcore.ops' fused barrier reductions (issue 2)."""
    try:
        from nrcore import ops
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise RuntimeError(f"mlc-d/ebomlc need nrcore.ops (barrier_stats, ...): {exc}") from exc
    missing = [n for n in ("barrier_stats", "barrier_coefficient", "barrier_combine_") if not hasattr(ops, n)]
    if missing:
        raise RuntimeError(f"nrcore.ops lacks {', '.join(missing)}: mlc-d/ebomlc cannot run")
    return ops
