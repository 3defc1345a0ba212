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
`ce` run (see `TransitionCorrection`). Differences from the authors' Keras code
(giorgiop/loss-correction): the phase-1 model is the last epoch's (they reload the checkpoint
with the lowest *noisy* validation loss; nrcore keeps its validation split clean and for model
selection only); the percentile filter does not overwrite the predictions it reads (theirs
does, in place); the estimate, not the true matrix, is what we log as the estimate (their
`est_forward` prints the true P under that name).
"""

from __future__ import annotations

from nrcore.methods._baselines import TransitionCorrection, anchor_point_transition, forward_corrected_nll, predict_split
from nrcore.methods.base import Option, register


@register
class Forward(TransitionCorrection):
    name = "forward"
    summary = "forward loss correction with the true or an anchor-point-estimated noise matrix (two phases when estimated)"
    paper = "Patrini et al., CVPR 2017"
    options = (
        Option("transition", ("estimate", "true"), "estimate", "noise matrix: anchor-point estimate from a model first trained on the noisy labels (2x the epochs), or the true matrix (oracle)"),
        Option("anchor_percentile", float, 97.0, "anchor of class i: the training example at this percentile of p(noisy i | x) (100: the argmax of Eq. 9; the authors use 97)"),
    )

    def __init__(self, ctx, transition: str = "estimate", anchor_percentile: float = 97.0):
        if not 0 < anchor_percentile <= 100:
            raise ValueError(f"--anchor-percentile must be in (0, 100], got {anchor_percentile}")
        self.anchor_percentile = anchor_percentile
        if transition == "true":
            if ctx.task.transition_matrix is None:
                raise ValueError("--transition true: this task has no known noise matrix; use --transition estimate")
            super().__init__(ctx, phased=False, initial_transition=ctx.task.transition_matrix)
        elif transition == "estimate":
            super().__init__(ctx, phased=True)
        else:
            raise ValueError(f"--transition must be 'estimate' or 'true', got {transition!r}")

    def estimate_transition(self):
        probs, _ = predict_split(self.model, self.ctx.task, "train", self.ctx.batch_size, self.ctx.device)
        return anchor_point_transition(probs, self.anchor_percentile)

    def corrected_loss(self, batch, clean):
        return forward_corrected_nll(self.model(batch.x), batch.y, self.transition).mean()
