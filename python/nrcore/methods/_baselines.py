"""Pieces the baseline methods share (not a method itself: `_` modules are not registered).

* Loss correction with a noise transition matrix (`forward`, `glc`): the forward-corrected
  loss, the two estimators of the matrix (Patrini's anchor points on a model trained on the
  noisy data; GLC's class means of that model's predictions on the trusted set) and
  `TransitionCorrection`, the two-phase method both build on.
* Small-loss selection between two networks (`coteaching`, `coteaching-plus`): the forget-rate
  schedule, the selection rule and `TwoNetworkSelection`.

Convention (spec): `T[c, c'] = P(noisy label c' | true class c)`, rows sum to one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from nrcore.methods.base import Method, StepOutput

# ---- loss correction with a transition matrix ---------------------------------------------


def forward_corrected_nll(logits: torch.Tensor, labels: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """Per-example forward-corrected loss `-log( (T^T softmax(logits))[y~] )` [B].

    The model's clean-class posterior is pushed through the noise process before the noisy label
    is scored (Patrini et al. 2017, Eq. 8; GLC's untrusted loss). Computed as a logsumexp over
    `log softmax + log T[:, y~]` so tiny probabilities do not underflow; entries of T that are
    exactly zero stay impossible (clamped at 1e-12 so a column of zeros cannot give NaN)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    log_columns = torch.log(transition.float().clamp_min(1e-12)).t()[labels]  # [B, C]: log T[j, y~_i]
    return -torch.logsumexp(log_probs + log_columns, dim=1)


def anchor_point_transition(probs: torch.Tensor, percentile: float = 97.0) -> torch.Tensor:
    """Patrini et al. (2017) anchor-point estimate of T from noisy-class posteriors.

    probs: [N, C] softmax outputs `p(y~ | x)` of a model trained on the noisy labels.
    For each class i the anchor is the example that maximises `p(y~ = i | x)` (Eq. 9); row i of
    the estimate is that example's posterior, `T[i, j] = p(y~ = j | x_anchor_i)` (Eq. 10), then
    rows are normalised. `percentile < 100` takes instead the example with the largest
    `p(y~ = i | x)` strictly below the given percentile of that column (the authors' robust
    variant, 97 in their code for all datasets but CIFAR-100), which ignores overconfident
    outliers. Unlike the authors' code this never modifies `probs` (theirs zeroes the top 3%
    of each column in place, changing the rows later classes read)."""
    probs = probs.double()
    n, c = probs.shape
    if not 0 < percentile <= 100:
        raise ValueError(f"anchor percentile must be in (0, 100], got {percentile}")
    rows = []
    for i in range(c):
        column = probs[:, i]
        if percentile < 100:
            # numpy's percentile(..., interpolation="higher"): the order statistic at ceil(q (n-1))
            threshold = column.sort().values[min(n - 1, math.ceil(percentile / 100 * (n - 1)))]
            below = torch.where(column < threshold, column, torch.full_like(column, -1.0))
            anchor = int(below.argmax()) if bool((below >= 0).any()) else int(column.argmax())
        else:
            anchor = int(column.argmax())
        rows.append(probs[anchor])
    estimate = torch.stack(rows)
    return estimate / estimate.sum(dim=1, keepdim=True)


def class_mean_transition(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """GLC (Hendrycks et al. 2018, Eq. 1) estimate of T from the trusted set.

    probs: [m, C] softmax outputs `p(y~ | x)` of a model trained on the noisy labels, for the
    trusted examples; labels: their clean labels [m]. Row i is the mean predicted noisy-label
    distribution of the trusted examples of class i: `C[i, j] = mean_{x: y = i} p(y~ = j | x)`.
    A class without trusted examples gets the identity row (no evidence of noise; the authors'
    code would give NaN)."""
    probs = probs.double()
    labels = labels.to(probs.device)
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).double()
    estimate = torch.eye(num_classes, dtype=torch.float64, device=probs.device)
    present = counts > 0
    estimate[present] = sums[present] / counts[present, None]
    return estimate


@torch.no_grad()
def _predict(model: torch.nn.Module, loader) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs and labels over `loader`, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    try:
        for batch in loader:
            probs.append(F.softmax(model(batch.x).float(), dim=1))
            labels.append(batch.y)
    finally:
        model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def predict_split(model: torch.nn.Module, task, split: str, batch_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs [N, C] and labels [N] of `model` on a whole split, in eval mode, without
    augmentation; the model's previous mode is restored."""
    return _predict(model, task.loader(split, batch_size, device=device))


def predict_examples(model: torch.nn.Module, task, split: str, indices: torch.Tensor, batch_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """`predict_split` restricted to the examples `indices` of `split` (in that order). In-memory
    splits are read at those rows only; other splits (streamed) are predicted whole, then cut."""
    source = getattr(task, split)
    indices = indices.cpu()
    if getattr(source, "images", None) is None:
        probs, labels = predict_split(model, task, split, batch_size, device)
        return probs[indices.to(probs.device)], labels[indices.to(labels.device)]
    from nrcore.data.loader import make_loader
    from nrcore.data.types import Split

    subset = Split(labels=source.labels[indices], true_labels=source.true_labels[indices], source_index=source.source_index[indices], images=source.images[indices])
    loader = make_loader(task, subset, batch_size, shuffle=False, augment=False, drop_last=False, generator=None, device=device, num_workers=None)
    return _predict(model, loader)


def transition_error(estimate: torch.Tensor, truth: Optional[torch.Tensor]) -> Optional[float]:
    """Mean L1 distance between the rows of an estimated and the true matrix (0..2); analysis only."""
    if truth is None:
        return None
    return float((estimate.double().cpu() - truth.double().cpu()).abs().sum(dim=1).mean())


class TransitionCorrection(Method):
    """One network trained with a loss corrected by a transition matrix.

    With `phased` (estimated matrices), a run has two phases of `epochs` epochs each, and each
    phase sees the run's whole learning-rate schedule (`schedule_epoch`):

    1. cross-entropy on the noisy labels (the model whose predictions estimate the matrix);
    2. at the first epoch of phase 2, `estimate_transition()` is called with that model, then
       the network is re-initialised (a fresh draw from the RNG the trainer seeds per epoch), its
       optimiser state cleared, and it trains with `corrected_loss`.

    A phased run therefore costs two ordinary runs. The metrics of every epoch carry `phase`
    (1 or 2); only phase-2 epochs are results of the method. Without `phased` the matrix is
    given up front (`initial_transition`) and the run is one phase of correction.

    Subclasses define `corrected_loss(batch, clean)` and, when phased,
    `estimate_transition()`. Changing `--epochs` when resuming moves the phase boundary: don't.
    """

    def __init__(self, ctx, phased: bool, initial_transition: Optional[torch.Tensor] = None):
        super().__init__(ctx)
        self.phased = phased
        self.model = self.track("model", ctx.build_model())
        self.opt = self.track("optimizer", ctx.make_optimizer(self.model.parameters()))
        start = torch.eye(ctx.num_classes, dtype=torch.float64) if initial_transition is None else initial_transition
        self.transition = self.track("transition", start.detach().to(device=ctx.device, dtype=torch.float32).clone())
        self.correcting = not phased

    # ---- phases ----------------------------------------------------------------------------
    def num_epochs(self, epochs: int) -> int:
        return 2 * epochs if self.phased else epochs

    def schedule_epoch(self, epoch: int) -> int:
        return epoch % self.ctx.epochs if self.phased else epoch

    def phase(self, epoch: int) -> int:
        return 2 if not self.phased or epoch >= self.ctx.epochs else 1

    def counts_for_selection(self, epoch: int) -> bool:
        return self.phase(epoch) == 2  # phase 1 is plain cross-entropy, not this method's model

    def start_epoch(self, epoch: int) -> None:
        self.correcting = self.phase(epoch) == 2
        if self.phased and epoch == self.ctx.epochs:
            self.transition.copy_(self.estimate_transition().to(self.transition))
            fresh = self.ctx.build_model()  # the trainer seeded the global RNG for this epoch: resumable
            self.model.load_state_dict(fresh.state_dict())
            self.opt.state.clear()  # no momentum carried over from phase 1

    def estimate_transition(self) -> torch.Tensor:
        raise NotImplementedError

    # ---- training --------------------------------------------------------------------------
    def scheduled_optimizers(self):
        return [self.opt]

    def corrected_loss(self, batch, clean) -> torch.Tensor:
        raise NotImplementedError

    def phase1_loss(self, batch) -> torch.Tensor:
        """Phase 1's loss: cross-entropy on the noisy labels (subclasses may leave examples out)."""
        return F.cross_entropy(self.model(batch.x), batch.y)

    def train_step(self, batch, clean):
        if self.correcting:
            loss = self.corrected_loss(batch, clean)
        else:
            loss = self.phase1_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return StepOutput(loss=loss.detach())

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        out: Dict[str, float] = {"phase": self.phase(epoch)}
        if self.phase(epoch) == 2:
            err = transition_error(self.transition, self.ctx.task.transition_matrix)
            if err is not None:
                out["transition_l1_error"] = err
        return out

    def eval_model(self):
        return self.model

    def artifact_info(self) -> Dict[str, object]:
        """Extra entries for transition.json (subclasses: how the matrix was obtained)."""
        return {}

    def save_artifacts(self, run_dir: Path) -> None:
        """transition.json: the matrix used for the correction (and the true one, if known)."""
        from nrcore.atomic import atomic_write_json

        truth = self.ctx.task.transition_matrix
        atomic_write_json(
            Path(run_dir) / "transition.json",
            {
                "used": self.transition.double().cpu().tolist(),
                "true": None if truth is None else truth.double().cpu().tolist(),
                "row_l1_error": transition_error(self.transition, truth),
                "convention": "T[c, c'] = P(noisy c' | true c)",
                **self.artifact_info(),
            },
        )


# ---- small-loss selection between two networks ---------------------------------------------


def forget_rate_at(epoch: int, forget_rate: float, num_gradual: int, exponent: float = 1.0) -> float:
    """Co-teaching's schedule: the fraction of each batch dropped during `epoch` (0-based).

    Han et al. (2018), Alg. 1: `R(T) = 1 - tau * min(T / T_k, 1)` is the fraction kept in epoch
    T+1 after T finished epochs, so the first epoch keeps everything and the full rate tau is
    reached after `T_k = num_gradual` epochs. `exponent` c bends the ramp, `T^c / T_k`, for
    studies of its shape (the paper varies c in {0.5, 1, 2}); c = 1 is the paper's main setting. The authors' code uses `linspace(0, tau, T_k)`, which reaches tau one epoch earlier."""
    if num_gradual <= 0:
        return forget_rate
    return forget_rate * min(epoch**exponent / num_gradual, 1.0)


def small_loss_mask(losses: torch.Tensor, keep_fraction: float, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [B]: the `ceil(keep_fraction * n)` smallest `losses` among the `n` candidates.

    "Small loss" is the selection of Co-teaching (all examples are candidates) and Co-teaching+
    (the candidates are the examples the two networks disagree on); `|D'| >= R |D|` in the
    papers, hence the ceiling. Runs on the device without a host sync: the count is a tensor."""
    if candidates is None:
        candidates = torch.ones_like(losses, dtype=torch.bool)
    n = candidates.sum()
    keep = torch.ceil(keep_fraction * n.double() - 1e-6)  # -1e-6: (1 - 0.8) * 100 must keep 20, not 21
    ranked = torch.where(candidates, losses.detach(), torch.full_like(losses, math.inf))
    order = torch.argsort(ranked, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank < keep


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (0 when the mask is empty): one average, not two."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def cross_update_losses(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    labels: torch.Tensor,
    keep_fraction: float,
    candidates: Optional[torch.Tensor] = None,
    select_all: Optional[torch.Tensor] = None,
):
    """The cross update of Co-teaching: each network picks its small-loss examples and its
    peer learns from them. Returns (loss of network 1, loss of network 2, mask picked by
    network 1, mask picked by network 2); both losses are per-example cross-entropies of the
    logits averaged once over the peer's selection. `select_all`, a 0-d bool tensor: where
    true, both networks pick the whole batch (Co-teaching+'s fallback; a tensor, so no sync)."""
    ce1 = F.cross_entropy(logits1, labels, reduction="none")
    ce2 = F.cross_entropy(logits2, labels, reduction="none")
    picked1 = small_loss_mask(ce1, keep_fraction, candidates)
    picked2 = small_loss_mask(ce2, keep_fraction, candidates)
    if select_all is not None:
        picked1, picked2 = picked1 | select_all, picked2 | select_all
    return masked_mean(ce1, picked2), masked_mean(ce2, picked1), picked1, picked2


def default_forget_rate(task) -> float:
    """The nominal noise rate of the task (Co-teaching assumes it known: tau = epsilon). For real
    label sets without a nominal rate, the off-diagonal mass of the task's transition matrix."""
    if task.noise_rate_nominal is not None:
        return float(task.noise_rate_nominal)
    if task.transition_matrix is not None:
        return float(1.0 - torch.diagonal(task.transition_matrix.double()).mean())
    raise ValueError("this task has no nominal noise rate: pass --forget-rate")


class TwoNetworkSelection(Method):
    """Two networks of the run's architecture, each with its own optimiser, that train on
    examples selected by their peer. Subclasses define `losses(logits1, logits2, batch)`
    returning (loss1, loss2, stats). The first network is the one evaluated."""

    def __init__(self, ctx, forget_rate: Optional[float], num_gradual: int, forget_exponent: float):
        super().__init__(ctx)
        self.model1 = self.track("model1", ctx.build_model())
        self.model2 = self.track("model2", ctx.build_model())
        self.opt1 = self.track("optimizer1", ctx.make_optimizer(self.model1.parameters()))
        self.opt2 = self.track("optimizer2", ctx.make_optimizer(self.model2.parameters()))
        self.forget_rate = default_forget_rate(ctx.task) if forget_rate is None else float(forget_rate)
        if not 0 <= self.forget_rate < 1:
            raise ValueError(f"--forget-rate must be in [0, 1), got {self.forget_rate}")
        if num_gradual < 0:
            raise ValueError(f"--num-gradual must be >= 0, got {num_gradual}")
        self.num_gradual = num_gradual
        self.forget_exponent = forget_exponent
        self.epoch, self.epoch_forget_rate = 0, 0.0  # set by start_epoch

    def scheduled_optimizers(self):
        return [self.opt1, self.opt2]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_forget_rate = forget_rate_at(epoch, self.forget_rate, self.num_gradual, self.forget_exponent)

    def losses(self, logits1, logits2, batch):
        raise NotImplementedError

    def train_step(self, batch, clean):
        logits1, logits2 = self.model1(batch.x), self.model2(batch.x)
        loss1, loss2, stats = self.losses(logits1, logits2, batch)
        self.opt1.zero_grad(set_to_none=True)
        self.opt2.zero_grad(set_to_none=True)
        (loss1 + loss2).backward()  # the two graphs are disjoint: each network gets its own gradient
        self.opt1.step()
        self.opt2.step()
        return StepOutput(loss=((loss1 + loss2) / 2).detach(), stats=stats)

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        return {"forget_rate": self.epoch_forget_rate}

    def eval_model(self):
        return self.model1

    @staticmethod
    def selection_stats(picked: torch.Tensor, batch) -> Dict[str, torch.Tensor]:
        """Fraction of the batch network 1 picked and, for analysis, how many of those carry
        their true label (the papers' "label precision")."""
        stats = {"selected_frac": picked.float().mean()}
        if batch.y_true is not None:
            stats["label_precision"] = masked_mean((batch.y == batch.y_true).float(), picked)
        return stats
