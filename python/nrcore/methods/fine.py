"""FINE, sample selection (Kim, Ko, Cho, Choi and Yun, "FINE Samples for Learning with Noisy
Labels", NeurIPS 2021; authors' code Kthyeon/FINE_official, dynamic_selection/).

A clean example's penultimate feature lines up with the dominant direction of its class, a
mislabelled one does not. After `--fine-warmup` epochs of plain cross-entropy on every example,
and then every `--fine-every` epochs, the training set's features z_i are read in eval mode
(no augmentation) and, for each class c,

    u_c = principal eigenvector of  sum_{i kept, y~_i = c} z_i z_i^T        (the previous selection; all at first)
    s_i = |<u_{y~_i}, z_i / ||z_i||>|                                        (`--fine-score square`: its square, the paper's form)
    p_i = GMM posterior of the higher-mean component of class y~_i's scores  (two components, fitted per class)

and the examples with p_i > `--fine-threshold` (zeta, 0.5) are kept: until the next selection
every step is cross-entropy averaged over the kept examples of its batch (a masked mean, no host
sync). Same cost as `ce` per step, plus one eval-mode pass over the training set per selection.
Metrics add `kept_frac`, `label_precision` and `clean_recall` (from the true labels: analysis
only) and `fine_selected` (1 in epochs that start with a selection). `nrcore audit` gets
`fine_noisy_posterior`, 1 - p_i from the final network. Paper-vs-code choices and deviations:
docs/methods-baselines.md ("FINE").
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from nrcore.methods.base import ExampleSignal, Option, SingleModelMethod, StepOutput, check_number, masked_mean, register
from nrcore.methods.families.mixture import FINE_GMM, fit_two_component_gmm

# The authors' CIFAR-10 sample-selection run (scripts/sample_selection_based/fine_cifar.sh with
# hyperparams/multistep/config_cifar10_cce_rn34.json): ResNet-34, 120 epochs, SGD lr 0.02,
# momentum 0.9, weight decay 1e-3, batch 128, lr x0.01 at epochs 40 and 80; FINE from epoch 41,
# every 10 epochs. All 50,000 images train (no trusted set).
PAPER_SETTING = dict(model="resnet34", epochs=120, batch_size=128, lr=0.02, momentum=0.9, weight_decay=1e-3,
                     schedule="multistep", milestones=[40, 80], gamma=0.01, clean_size=None, clean_frac=None,
                     fine_warmup=40, fine_every=10)  # fmt: skip


@torch.no_grad()
def train_features(model, task, batch_size: int, device) -> torch.Tensor:
    """Penultimate features [n, d] (float64, CPU) of the whole training split in order, in eval
    mode (running BatchNorm statistics, as the authors' `get_features`) and without augmentation;
    the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        feats = [model(batch.x, return_features=True)[1].double().cpu() for batch in task.loader("train", batch_size, device=device)]
    finally:
        model.train(was_training)
    return torch.cat(feats)


def principal_directions(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, basis: torch.Tensor) -> torch.Tensor:
    """u_c [C, d]: the eigenvector of the largest eigenvalue of the Gram matrix F_c^T F_c of the
    raw features of class c's examples in `basis` (bool [n]), as the code's SVD of them; a class
    with no example in `basis` uses all its examples, and a class with none at all a zero vector
    (its examples then score 0). The sign is arbitrary; the scores do not depend on it."""
    feats = feats.double()
    out = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
    for c in range(num_classes):
        of_class = labels == c
        rows = of_class & basis
        if not bool(rows.any()):
            rows = of_class
        if not bool(rows.any()):
            continue
        f = feats[rows]
        _, vectors = torch.linalg.eigh(f.T @ f)
        out[c] = vectors[:, -1]
    return out


def alignment_scores(feats: torch.Tensor, labels: torch.Tensor, directions: torch.Tensor, score: str = "abs") -> torch.Tensor:
    """s_i [n]: |<u_{y_i}, z_i / ||z_i||>| ("abs", the authors' `get_score`) or its square
    ("square", the paper's <u, z>^2 on normalised features); a zero feature scores 0."""
    feats = feats.double()
    unit = feats / feats.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    inner = (unit * directions[labels]).sum(dim=1)
    if score == "abs":
        return inner.abs()
    if score == "square":
        return inner**2
    raise ValueError(f"--fine-score must be abs or square, got {score!r}")


def clean_posterior(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, gmm=FINE_GMM) -> torch.Tensor:
    """p_i [n] float64: for each class, a two-component GMM on its examples' scores and the
    posterior of the component with the higher mean (high alignment: clean). A class with fewer
    than two examples cannot be fitted: its examples get 1 (kept)."""
    out = torch.ones(scores.shape[0], dtype=torch.float64)
    for c in range(num_classes):
        rows = (labels == c).nonzero().flatten()
        if rows.numel() >= 2:
            low, _ = fit_two_component_gmm(scores[rows], **gmm)
            out[rows] = 1 - low
    return out


def fine_selection(feats, labels, num_classes: int, basis: torch.Tensor, threshold: float, score: str = "abs") -> Tuple[torch.Tensor, torch.Tensor]:
    """One FINE selection: (p_clean float64 [n], keep bool [n] = p_clean > threshold)."""
    labels = labels.cpu()
    directions = principal_directions(feats, labels, num_classes, basis.cpu())
    p_clean = clean_posterior(alignment_scores(feats, labels, directions, score), labels, num_classes)
    return p_clean, p_clean > threshold


def selection_stats(keep: torch.Tensor, labels: torch.Tensor, true_labels: torch.Tensor) -> Dict[str, float]:
    """kept_frac; where true labels are known, label_precision (the kept examples whose label is
    right) and clean_recall (the correctly labelled examples that are kept)."""
    keep = keep.cpu().bool()
    stats = {"kept_frac": float(keep.double().mean())}
    known = true_labels >= 0
    right = (labels == true_labels) & known
    if bool((keep & known).any()):
        stats["label_precision"] = float((keep & right).sum()) / float((keep & known).sum())
    if bool(right.any()):
        stats["clean_recall"] = float((keep & right).sum()) / float(right.sum())
    return stats


@register
class FINE(SingleModelMethod):
    name = "fine"
    supports_loss_scaling = True
    summary = "FINE: keep the examples whose features align with their class's principal eigenvector (per-class GMM), CE on them"
    paper = "Kim, Ko, Cho, Choi and Yun, NeurIPS 2021"
    options = (
        Option("fine_warmup", int, 40, "epochs of plain cross-entropy on every example before the first selection (authors' code: 40)"),
        Option("fine_every", int, 10, "epochs between selections after the warm-up (authors' code: 10; 1: every epoch)"),
        Option("fine_threshold", float, 0.5, "zeta: keep an example when its class GMM's clean-component posterior exceeds this"),
        Option("fine_score", ("abs", "square"), "abs", "alignment score: |<u, z/|z|>| (authors' code) or its square (the paper's formula)"),
    )
    presets = {"fine-cifar10": dict(dataset="cifar10", **PAPER_SETTING), "fine-cifar100": dict(dataset="cifar100", **PAPER_SETTING)}

    def __init__(self, ctx, fine_warmup: int = 40, fine_every: int = 10, fine_threshold: float = 0.5, fine_score: str = "abs"):
        super().__init__(ctx)
        check_number("fine_warmup", fine_warmup, minimum=0)
        check_number("fine_every", fine_every, minimum=1)
        check_number("fine_threshold", fine_threshold, minimum=0)
        if fine_threshold >= 1:
            raise ValueError(f"--fine-threshold must be < 1 (a posterior above it is kept), got {fine_threshold!r}")
        if fine_score not in ("abs", "square"):
            raise ValueError(f"--fine-score must be abs or square, got {fine_score!r}")
        self.warmup, self.every, self.threshold, self.score = int(fine_warmup), int(fine_every), float(fine_threshold), fine_score
        # the selection in force (1 kept, 0 dropped); it lasts `every` epochs, so it is saved
        # with the checkpoint (not per-step state: only start_epoch writes it)
        self.keep = self.track("keep", torch.ones(ctx.n_train, device=ctx.device))
        self.selected_now = False

    def selects_at(self, epoch: int) -> bool:
        """Whether `epoch` (0-based) starts with a selection: the first after the warm-up, then every `every`."""
        return epoch >= self.warmup and (epoch - self.warmup) % self.every == 0

    def select(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """A selection from the current network: (p_clean [n], keep [n]); changes nothing."""
        task = self.ctx.task
        feats = train_features(self.model, task, self.ctx.batch_size, self.ctx.device)
        return fine_selection(feats, task.train.labels, task.num_classes, self.keep.cpu() > 0, self.threshold, self.score)

    def start_epoch(self, epoch: int) -> None:
        self.selected_now = self.selects_at(epoch)
        if self.selected_now:
            _, keep = self.select()
            self.keep.copy_(keep.to(self.keep))

    def train_step(self, batch, clean):
        logits = self.model(batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        loss = masked_mean(losses, self.keep[batch.index])
        self.opt.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt)
        return StepOutput(loss=loss.detach(), logits=logits.detach())

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        train = self.ctx.task.train
        return {**selection_stats(self.keep > 0, train.labels, train.true_labels), "fine_selected": float(self.selected_now)}

    audit_default = "fine_noisy_posterior"

    def audit_signals(self):
        p_clean, _ = self.select()
        description = ("1 - the posterior of the high-alignment (clean) component of a GMM on the example's class's FINE scores, "
                       "from the final network's features")  # fmt: skip
        return {"fine_noisy_posterior": ExampleSignal(1 - p_clean, None, description)}
