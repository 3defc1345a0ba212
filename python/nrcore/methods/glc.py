"""Gold Loss Correction, GLC (Hendrycks, Mazeika, Wilson and Gimpel, NeurIPS 2018).

Algorithm 1 of the paper, in two phases of `--epochs` epochs each, both with the run's
learning-rate schedule (so a run costs about twice a `ce` run):

1. Train the network with cross-entropy on the noisy (untrusted) labels only.
2. Estimate the corruption matrix from the trusted set: `C[i, j] = mean over the trusted
   examples x of class i of p(y~ = j | x)`, the phase-1 network's softmax, in eval mode and
   without augmentation (Eq. 1). Then train a freshly initialised network on the union of both
   sets: untrusted examples with the forward-corrected loss `-log((C^T p(y | x))[y~])`, trusted
   examples with plain cross-entropy on their clean labels.

The trainer draws a trusted batch with every noisy batch. The authors' code runs one loader
over the concatenated sets (loss summed over the batch and divided by its size), so every
example of the union counts equally and a batch holds about `B m / (n + m)` trusted examples
(n, m the sizes of the two sets; about 2 in 100 with a 2% trusted set). nrcore keeps both:
the objective is `L = (n * mean_noisy + m * mean_trusted) / (n + m)`, and each step uses only
the first `ceil(B m / n)` examples of the trusted batch, so phase 2 costs what phase 1 costs
and the trusted set is seen about once per epoch, as in the reference. Both parts share one
forward pass. A class without trusted examples keeps an identity row (the authors' code gives
NaN). The phase-2 network is a fresh initialisation (the authors reload phase 1's initial
weights, and keep phase 1's momentum buffers; nrcore clears them). The base-rate-adjusted and
calibrated variants of the paper's appendix are not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nrcore.methods.families.transition import TransitionCorrection, class_mean_transition, forward_corrected_nll
from nrcore.models.inference import predict_split
from nrcore.methods.base import register


@register
class GoldLossCorrection(TransitionCorrection):
    name = "glc"
    summary = "Gold Loss Correction: noise matrix from the trusted set's predictions, then forward correction + trusted CE (two phases)"
    paper = "Hendrycks et al., NeurIPS 2018"
    needs_clean = True

    def __init__(self, ctx):
        super().__init__(ctx, phased=True)
        n, m = len(ctx.task.train), len(ctx.task.clean)
        self.trusted_share = m / (n + m)
        self.trusted_per_step = max(1, math.ceil(ctx.batch_size * m / n))

    def estimate_transition(self):
        probs, labels = predict_split(self.model, self.ctx.task, "clean", self.ctx.batch_size, self.ctx.device)
        return class_mean_transition(probs, labels, self.ctx.num_classes)

    def corrected_loss(self, batch, clean):
        k = self.trusted_per_step  # the clean loader shuffles: its first k are a random draw
        logits = self.model(torch.cat([batch.x, clean.x[:k]]))
        noisy_logits, clean_logits = logits[: len(batch)], logits[len(batch) :]
        untrusted = forward_corrected_nll(noisy_logits, batch.y, self.transition).mean()
        trusted = F.cross_entropy(clean_logits, clean.y[:k])
        return (1 - self.trusted_share) * untrusted + self.trusted_share * trusted, noisy_logits
