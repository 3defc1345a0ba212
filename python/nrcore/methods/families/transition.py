"""Loss correction with a noise transition matrix, shared by `forward` and `glc` (not a method
itself: nothing in families/ is registered): the forward-corrected loss, the two estimators of the
matrix (Patrini's anchor points on a model trained on the noisy data; GLC's class means of that
model's predictions on the trusted set) and `TransitionCorrection`, the two-phase method both
build on.

Convention (docs/method-contract.md): `T[c, c'] = P(noisy label c' | true class c)`, rows sum to one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from nrcore.methods.base import ExampleSignal, SingleModelMethod, StepOutput

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


def clean_label_posterior(probs: torch.Tensor, labels: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """`P(y = j | x, y~)` [N, C] by Bayes' rule under the noise model: the clean-class posterior
    `p(j | x)` [N, C] times the chance `T[j, y~]` that class j shows up as the given label, over
    their sum (a given label no class can produce keeps the model's posterior)."""
    joint = probs.double() * transition.double().t()[labels.to(probs.device)]  # [N, C]: p(j | x) T[j, y~_i]
    total = joint.sum(dim=1, keepdim=True)
    return torch.where(total > 0, joint / total.clamp_min(1e-300), probs.double())


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


def transition_error(estimate: torch.Tensor, truth: Optional[torch.Tensor]) -> Optional[float]:
    """Mean L1 distance between the rows of an estimated and the true matrix (0..2); analysis only."""
    if truth is None:
        return None
    return float((estimate.double().cpu() - truth.double().cpu()).abs().sum(dim=1).mean())


class TransitionCorrection(SingleModelMethod):
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

    supports_loss_scaling = True

    def __init__(self, ctx, phased: bool, initial_transition: Optional[torch.Tensor] = None):
        super().__init__(ctx)
        self.phased = phased
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
    def corrected_loss(self, batch, clean) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the corrected loss, the noisy batch's logits)."""
        raise NotImplementedError

    def phase1_loss(self, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Phase 1's (loss, logits): cross-entropy on the noisy labels (subclasses may leave
        examples out)."""
        logits = self.model(batch.x)
        return F.cross_entropy(logits, batch.y), logits

    def train_step(self, batch, clean):
        if self.correcting:
            loss, logits = self.corrected_loss(batch, clean)
        else:
            loss, logits = self.phase1_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), logits=logits.detach())

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        out: Dict[str, float] = {"phase": self.phase(epoch)}
        if self.phase(epoch) == 2:
            err = transition_error(self.transition, self.ctx.task.transition_matrix)
            if err is not None:
                out["transition_l1_error"] = err
        return out

    # The clean-class posterior that the corrected loss trains the model to output. Also saved:
    # `label_posterior`, the chance that the given label is the true one by the run's own noise
    # model, which ranked worse on a digits pair40 glc run (average precision 0.927 against 0.973).
    audit_default = "final_prediction"

    def audit_signals(self) -> Dict[str, ExampleSignal]:
        from nrcore.models.inference import predict_split

        task = self.ctx.task
        probs, labels = predict_split(self.model, task, "train", self.ctx.batch_size, self.ctx.device)
        posterior = clean_label_posterior(probs, labels, self.transition)
        given = posterior.gather(1, labels.to(posterior.device)[:, None])[:, 0]
        return {"label_posterior": ExampleSignal(
            1 - given, posterior.argmax(dim=1),
            "P(true label = given | x, given) by Bayes' rule from the final model's clean-class posterior and the run's "
            "transition matrix; score = 1 - that",
        )}

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
