"""Forward loss correction (Patrini et al., CVPR 2017).

The network models the clean posterior `p(y | x)`; the loss scores the noisy label under the
noise process, `l(x, y~) = -log( sum_j p(j | x) T[j, y~] )` (Eq. 8 of the paper), so that the
minimiser of the noisy risk is the clean classifier when T is right.

`--transition true` uses the task's true noise matrix (an oracle: "forward T" in the paper's
tables). `--transition estimate` (default) is the paper's "forward T^": a first phase trains
the network with cross-entropy on the noisy labels; T^ is estimated from its predictions on the
noisy training inputs with the anchor-point estimator (Eqs. 9-10, `--anchor-percentile`), and a
second phase trains a freshly initialised network with the corrected loss. Each phase runs the
full `--epochs` with the run's learning-rate schedule, so an estimated run costs about twice a
`ce` run (see `TransitionCorrection`).

Phase 1 is early-stopped as in the authors' Keras code (giorgiop/loss-correction), which holds
out 10% of the noisy training set and reloads the checkpoint with the lowest loss on it: a
model trained to the end has memorised its noisy labels, and its over-confident posteriors make
an over-confident T^. `--phase1-holdout F` draws that fraction of the noisy training examples
once per seed; phase 1 does not train on them (they still pass through the network, masked out
of the loss), and after every phase-1 epoch their mean cross-entropy against their *noisy*
labels is measured (`holdout_nll`, eval mode); the estimate reads the anchors from the epoch
where it was lowest, among the examples phase 1 trained on. Phase 2 trains on every example
(nrcore's clean validation split, not the hold-out, selects its model). `0` estimates from the
last phase-1 epoch instead. Other differences from the authors' code: the percentile filter
does not overwrite the predictions it reads (theirs does, in place); the estimate, not the true
matrix, is what we log as the estimate (their `est_forward` prints the true P under that name).
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from nrcore.methods.families.transition import TransitionCorrection, anchor_point_transition, forward_corrected_nll
from nrcore.methods.base import Option, masked_mean, register
from nrcore.models.inference import predict_examples, predict_split


@register
class Forward(TransitionCorrection):
    name = "forward"
    summary = "forward loss correction with the true or an anchor-point-estimated noise matrix (two phases when estimated)"
    paper = "Patrini et al., CVPR 2017"
    options = (
        Option("transition", ("estimate", "true"), "estimate", "noise matrix: anchor-point estimate from a model first trained on the noisy labels (2x the epochs), or the true matrix (oracle)"),
        Option("anchor_percentile", float, 97.0, "anchor of class i: the training example at this percentile of p(noisy i | x) (100: the argmax of Eq. 9; the authors use 97)"),
        Option("phase1_holdout", float, 0.1, "with --transition estimate: fraction of the noisy training set held out of phase 1 to pick its epoch of lowest noisy loss for the estimate (the authors' 0.1; 0: the last epoch)"),
    )

    def __init__(self, ctx, transition: str = "estimate", anchor_percentile: float = 97.0, phase1_holdout: float = 0.1):
        if not 0 < anchor_percentile <= 100:
            raise ValueError(f"--anchor-percentile must be in (0, 100], got {anchor_percentile}")
        if not 0 <= phase1_holdout < 1:
            raise ValueError(f"--phase1-holdout must be in [0, 1), got {phase1_holdout}")
        self.anchor_percentile = anchor_percentile
        if transition == "true":
            if ctx.task.transition_matrix is None:
                raise ValueError("--transition true: this task has no known noise matrix; use --transition estimate")
            super().__init__(ctx, phased=False, initial_transition=ctx.task.transition_matrix)
        elif transition == "estimate":
            super().__init__(ctx, phased=True)
        else:
            raise ValueError(f"--transition must be 'estimate' or 'true', got {transition!r}")
        self.held_out = self._draw_holdout(ctx, phase1_holdout) if self.phased else None
        # the phase-1 epoch (1-based) with the lowest hold-out loss so far, and its weights (checkpointed)
        self.phase1_best = self.track("phase1_best", {"epoch": -1, "holdout_nll": math.inf, "model": None})

    @staticmethod
    def _draw_holdout(ctx, fraction: float):
        """bool [n_train] on the device, or None for no hold-out; depends only on the seed."""
        if fraction == 0:
            return None
        n = ctx.n_train
        count = int(round(fraction * n))
        if not 1 <= count < n:
            raise ValueError(f"--phase1-holdout {fraction} of {n} training examples leaves no hold-out or nothing to train on")
        order = torch.randperm(n, generator=ctx.generator(0, salt="forward-phase1-holdout"))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:count]] = True
        return mask.to(ctx.device)

    # ---- phase 1 ---------------------------------------------------------------------------
    def phase1_loss(self, batch):
        if self.held_out is None:
            return super().phase1_loss(batch)
        logits = self.model(batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        return masked_mean(losses, ~self.held_out[batch.index]), logits

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        out = super().end_epoch(epoch)
        if self.phase(epoch) == 1 and self.held_out is not None:
            held = self.held_out.nonzero().flatten()
            probs, labels = predict_examples(self.model, self.ctx.task, "train", held, self.ctx.batch_size, self.ctx.device)
            nll = float(-torch.log(probs.double().gather(1, labels.view(-1, 1)).clamp_min(1e-300)).mean())
            out["holdout_nll"] = nll
            if nll < self.phase1_best["holdout_nll"]:  # a NaN never wins; ties keep the earlier epoch
                weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                self.phase1_best.update(epoch=epoch + 1, holdout_nll=nll, model=weights)  # 1-based, as in metrics.jsonl
        return out

    # ---- the estimate ----------------------------------------------------------------------
    def estimate_transition(self):
        if self.held_out is None:
            probs, _ = predict_split(self.model, self.ctx.task, "train", self.ctx.batch_size, self.ctx.device)
            return anchor_point_transition(probs, self.anchor_percentile)
        if self.phase1_best["model"] is not None:  # None only if every hold-out loss was NaN
            self.model.load_state_dict(self.phase1_best["model"])
        fitted = (~self.held_out).nonzero().flatten()
        probs, _ = predict_examples(self.model, self.ctx.task, "train", fitted, self.ctx.batch_size, self.ctx.device)
        self.phase1_best["model"] = None  # phase 2 re-initialises the network: no need to keep (or checkpoint) these
        return anchor_point_transition(probs, self.anchor_percentile)

    def artifact_info(self):
        if not self.phased:
            return {}
        return {"phase1_holdout_examples": 0 if self.held_out is None else int(self.held_out.sum()), "phase1_epoch": self.phase1_best["epoch"] if self.held_out is not None else self.ctx.epochs}

    def corrected_loss(self, batch, clean):
        logits = self.model(batch.x)
        return forward_corrected_nll(logits, batch.y, self.transition).mean(), logits
