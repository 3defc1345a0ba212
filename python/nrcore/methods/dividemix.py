"""DivideMix (Li, Socher and Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised
Learning", ICLR 2020; authors' code LiJunnan1992/DivideMix, Train_cifar.py).

Two networks. During the warm-up (`--dm-warmup` epochs) both train with cross-entropy on every
example (plus the confidence penalty `mean sum_c p_c log p_c` for class-dependent noise, as the
code does for `asym`). From then on, at the start of every epoch each network k scores the whole
training set in eval mode with its per-example cross-entropy, min-max normalised to [0, 1], and
fits a two-component GMM to it (families/mixture.py); w_i^k = the posterior of the low-loss
component. Co-divide: network 1 trains with network 2's division and vice versa, an example
being labelled for network 1 when w_i^2 > tau (`--dm-p-threshold`) and unlabelled otherwise.
Each step, for each network k with peer o, on the step's batch and a second augmented view of it:

    labelled:   t_i = sharpen(w_i y_i + (1 - w_i) (p_k(x_i) + p_k(x_i')) / 2, T)            (co-refinement)
    unlabelled: t_i = sharpen((p_k(x_i) + p_k(x_i') + p_o(x_i) + p_o(x_i')) / 4, T)         (co-guessing)
    MixMatch:   lam ~ Beta(a, a), lam' = max(lam, 1 - lam); both views and their targets mixed
                with a random permutation of themselves: x~ = lam' x + (1 - lam') x[perm], same for t
    loss_k  = L_x + lambda_u(e) L_u + sum_c (1/C) log((1/C) / mean_j p_k(x~_j)_c)
    L_x = mean over labelled rows of -sum_c t~_c log p_k(x~)_c,  L_u = mean over unlabelled rows of mean_c (p_k(x~)_c - t~_c)^2

with lambda_u(e) = `--dm-lambda-u` x clip((e - warm-up) / 16, 0, 1), e the fractional epoch
(the code's `linear_rampup`). The networks' own predictions p_k come from train-mode forwards,
the peer's p_o from eval-mode ones, as in the code. Test/validation: the average of the two
networks' softmax outputs (the evaluated model is `AveragedPair`; its "logits" are the log of
that average). Defaults follow the paper and its Table 7 by noise level (`paper_defaults`).
Datasets without augmentation (digits, mnist10k) give two identical views. About 5-6x `ce` per
step after the warm-up, about 2x during it. docs/methods-baselines.md ("DivideMix") has the paper-vs-code choices.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nrcore.methods.base import ExampleSignal, Method, Option, StepOutput, check_number, masked_mean, register
from nrcore.methods.families.mixture import DIVIDEMIX_GMM, fit_two_component_gmm
from nrcore.methods.fine import selection_stats

RAMPUP_EPOCHS = 16  # linear_rampup's rampup_length in the authors' code

# The paper's CIFAR setting (Section 4.1; Train_cifar.py): PreAct ResNet-18, 300 epochs, SGD lr
# 0.02 (momentum 0.9, weight decay 5e-4), lr /10 after 150 epochs, batch 128, all 50,000 images
# (no trusted set); warm-up 10 epochs on CIFAR-10, 30 on CIFAR-100.
PAPER_SETTING = dict(model="preact-resnet18", epochs=300, batch_size=128, lr=0.02, momentum=0.9, weight_decay=5e-4,
                     schedule="multistep", milestones=[150], gamma=0.1, clean_size=None, clean_frac=None)  # fmt: skip


def paper_defaults(task) -> Dict[str, object]:
    """The paper's settings for this task (Section 4.1 and Table 7; Train_cifar.py): warm-up 10
    epochs, 30 with 100 or more classes; lambda_u by symmetric noise percent (CIFAR-10 / CIFAR-100
    columns; the percent picks the nearest column: below 35 the 20% one, 0 / 25; below 85 the
    50% and 80% ones, 25 / 150; else the 90% one, 50 / 150), 0 for asymmetric noise, 0 for
    Clothing1M's real noise (Train_clothing1M.py), the code's 25 otherwise; at 85% or more
    symmetric noise tau 0.6 and the losses averaged over the last 5 epochs (else 0.5 and 1); the
    warm-up's confidence penalty for class-dependent noise (asym, pair, flip) and real noise."""
    many = task.num_classes >= 100
    spec = getattr(task, "noise", None)
    kind = getattr(spec, "kind", None) or "clean"
    percent = getattr(spec, "percent", None) or 0.0
    uniform = kind in ("sym", "unif")
    if kind in ("asym", "pair", "flip"):
        lambda_u = 0.0
    elif uniform:
        lambda_u = (25.0 if many else 0.0) if percent < 35 else (150.0 if many else 25.0) if percent < 85 else (150.0 if many else 50.0)
    else:
        lambda_u = 0.0 if kind == "real" else 25.0
    extreme = uniform and percent >= 85
    return dict(warmup=30 if many else 10, lambda_u=lambda_u, p_threshold=0.6 if extreme else 0.5, loss_window=5 if extreme else 1,
                conf_penalty=kind in ("asym", "pair", "flip", "real"))  # fmt: skip


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), rows renormalised."""
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def refined_targets(own: torch.Tensor, peer: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor, labelled: torch.Tensor,
                    temperature: float) -> torch.Tensor:  # fmt: skip
    """[B, C]: co-refinement for the labelled rows (w y + (1 - w) own, sharpened), co-guessing for
    the others ((own + peer) / 2, sharpened); `own`, `peer`: each network's softmax averaged
    over the two views."""
    w = w[:, None].to(own.dtype)
    refined = sharpen(w * onehot + (1 - w) * own, temperature)
    guessed = sharpen((own + peer) / 2, temperature)
    return torch.where(labelled[:, None], refined, guessed)


def semi_supervised_loss(logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor, lambda_u) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DivideMix's loss on a mixed batch: L_x (soft cross-entropy, labelled rows), lambda_u L_u
    (squared error of the probabilities, unlabelled rows, averaged over the classes too) and the
    uniform-prior penalty on the batch's mean prediction."""
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    lx = masked_mean(-(targets * log_p).sum(dim=1), labelled)
    lu = masked_mean(((p - targets) ** 2).mean(dim=1), ~labelled)
    prior = 1.0 / logits.shape[1]
    penalty = (prior * (math.log(prior) - torch.log(p.mean(dim=0)))).sum()
    return lx + lambda_u * lu + penalty, {"dm_lx": lx.detach(), "dm_lu": lu.detach(), "dm_penalty": penalty.detach()}


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """The code's NegEntropy: mean over the batch of sum_c p_c log p_c (minus the entropy)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return (log_p.exp() * log_p).sum(dim=1).mean()


def linear_rampup(epoch: float, warmup: int, lambda_u: float, length: int = RAMPUP_EPOCHS) -> float:
    """lambda_u x clip((epoch - warmup) / length, 0, 1), `epoch` fractional (the code's linear_rampup)."""
    return lambda_u * min(max((epoch - warmup) / length, 0.0), 1.0)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); all zeros when the values are equal (the code would divide by 0)."""
    lo, hi = values.min(), values.max()
    return (values - lo) / (hi - lo).clamp_min(torch.finfo(values.dtype).tiny)


@torch.no_grad()
def train_losses(model: nn.Module, task, batch_size: int, device) -> torch.Tensor:
    """Per-example cross-entropy [n] (float32, on `device`) of the whole training split against its
    labels, in eval mode and without augmentation (the code's eval_train); mode restored."""
    was_training = model.training
    model.eval()
    try:
        losses = [F.cross_entropy(model(b.x).float(), b.y, reduction="none") for b in task.loader("train", batch_size, device=device)]
    finally:
        model.train(was_training)
    return torch.cat(losses)


class AveragedPair(nn.Module):
    """The evaluated model: the log of the mean of two networks' softmax outputs (a valid logit
    vector: its softmax is that mean). `return_features=True` adds both networks' penultimate
    features side by side."""

    def __init__(self, net1: nn.Module, net2: nn.Module):
        super().__init__()
        self.net1, self.net2 = net1, net2

    def forward(self, x: torch.Tensor, return_features: bool = False):
        if return_features:
            (a, fa), (b, fb) = self.net1(x, return_features=True), self.net2(x, return_features=True)
        else:
            a, b = self.net1(x), self.net2(x)
        mean = (F.softmax(a.float(), dim=1) + F.softmax(b.float(), dim=1)) / 2
        logits = torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))
        return (logits, torch.cat([fa, fb], dim=1)) if return_features else logits


@register
class DivideMix(Method):
    name = "dividemix"
    supports_loss_scaling = True
    summary = "DivideMix: two networks, each GMM-divides the data by loss for its peer; MixMatch with co-refined and co-guessed targets"
    paper = "Li, Socher and Hoi, ICLR 2020"
    options = (
        Option("dm_warmup", int, None, "epochs of cross-entropy on both networks before dividing; unset: the paper's 10 (30 with 100+ classes)"),
        Option("dm_p_threshold", float, None, "tau: an example is labelled when the peer's clean posterior exceeds this; unset: 0.5 (0.6 at 85%+ symmetric noise)"),
        Option("dm_lambda_u", float, None, "lambda_u: weight of the unlabelled loss after its 16-epoch ramp; unset: the paper's Table 7 value for the noise"),
        Option("dm_temperature", float, 0.5, "T: sharpening temperature of the targets"),
        Option("dm_alpha", float, 4.0, "alpha of the Beta(alpha, alpha) mixing coefficient"),
        Option("dm_conf_penalty", ("auto", "on", "off"), "auto", "confidence penalty in the warm-up; auto: on for asym/pair/flip and real noise"),
        Option("dm_loss_window", int, None, "epochs of normalised losses averaged before each GMM fit; unset: 5 at 85%+ symmetric noise, else 1"),
    )
    presets = {"dividemix-cifar10": dict(dataset="cifar10", **PAPER_SETTING, dm_warmup=10),
               "dividemix-cifar100": dict(dataset="cifar100", **PAPER_SETTING, dm_warmup=30)}  # fmt: skip

    def __init__(self, ctx, dm_warmup: Optional[int] = None, dm_p_threshold: Optional[float] = None, dm_lambda_u: Optional[float] = None,
                 dm_temperature: float = 0.5, dm_alpha: float = 4.0, dm_conf_penalty: str = "auto", dm_loss_window: Optional[int] = None):  # fmt: skip
        super().__init__(ctx)
        paper = paper_defaults(ctx.task)
        self.warmup = int(paper["warmup"] if dm_warmup is None else dm_warmup)
        self.p_threshold = float(paper["p_threshold"] if dm_p_threshold is None else dm_p_threshold)
        self.lambda_u = float(paper["lambda_u"] if dm_lambda_u is None else dm_lambda_u)
        self.loss_window = int(paper["loss_window"] if dm_loss_window is None else dm_loss_window)
        check_number("dm_warmup", self.warmup, minimum=0)
        check_number("dm_p_threshold", self.p_threshold, minimum=0)
        if self.p_threshold >= 1:
            raise ValueError(f"--dm-p-threshold must be < 1 (a posterior above it is labelled), got {self.p_threshold!r}")
        check_number("dm_lambda_u", self.lambda_u, minimum=0)
        check_number("dm_temperature", dm_temperature, minimum=0, exclusive=True)
        check_number("dm_alpha", dm_alpha, minimum=0, exclusive=True)
        check_number("dm_loss_window", self.loss_window, minimum=1)
        if dm_conf_penalty not in ("auto", "on", "off"):
            raise ValueError(f"--dm-conf-penalty must be auto, on or off, got {dm_conf_penalty!r}")
        self.conf_penalty = bool(paper["conf_penalty"]) if dm_conf_penalty == "auto" else dm_conf_penalty == "on"
        self.temperature, self.alpha = float(dm_temperature), float(dm_alpha)
        if ctx.task.train.images is None and ctx.task.augmentation is not None:
            raise ValueError("dividemix needs the training images in memory (a second augmented view of every batch); this dataset streams them")

        self.model1 = self.track("model1", ctx.build_model())
        self.model2 = self.track("model2", ctx.build_model())
        self.opt1 = self.track("optimizer1", ctx.make_optimizer(self.model1.parameters()))
        self.opt2 = self.track("optimizer2", ctx.make_optimizer(self.model2.parameters()))
        self.ensemble = AveragedPair(self.model1, self.model2)
        n = ctx.n_train
        # each network's last normalised losses (a window of `loss_window` epochs) and how many
        # have been written: they outlive an epoch when the window is longer than one
        self.loss_history = self.track("loss_history", torch.zeros(2, self.loss_window, n, device=ctx.device))
        self.history_count = self.track("history_count", torch.zeros((), dtype=torch.int64))
        # clean posteriors of each network's GMM: recomputed for every example at the start of
        # each epoch after the warm-up, so neither per-step state nor in the checkpoint
        self.clean_prob = torch.ones(2, n, device=ctx.device)
        self.beta = torch.distributions.Beta(torch.full((2,), self.alpha, device=ctx.device), torch.full((2,), self.alpha, device=ctx.device),
                                             validate_args=False)  # fmt: skip
        self.steps_per_epoch = max(1, -(-n // ctx.batch_size))
        self.epoch, self.step, self.division_stats = 0, 0, {}

    def scheduled_optimizers(self):
        return [self.opt1, self.opt2]

    @property
    def models(self):
        return (self.model1, self.model2)

    # ---- the division, once per epoch ---------------------------------------------------------
    def fit_division(self, normalised: torch.Tensor) -> torch.Tensor:
        """Clean posterior [n] (float32, on the device) of one network's GMM on its normalised losses."""
        low, _ = fit_two_component_gmm(normalised, **DIVIDEMIX_GMM)
        return low.to(device=self.ctx.device, dtype=torch.float32)

    def current_losses(self) -> torch.Tensor:
        """[2, n]: each network's per-example losses on the training set, min-max normalised."""
        task, ctx = self.ctx.task, self.ctx
        return torch.stack([min_max(train_losses(m, task, ctx.batch_size, ctx.device)) for m in self.models])

    def divide(self) -> None:
        slot = int(self.history_count) % self.loss_window
        self.loss_history[:, slot] = self.current_losses()
        self.history_count += 1
        filled = min(int(self.history_count), self.loss_window)
        train = self.ctx.task.train
        self.division_stats = {}
        for k in range(2):
            self.clean_prob[k] = self.fit_division(self.loss_history[k, :filled].mean(dim=0))
            stats = selection_stats(self.clean_prob[k] > self.p_threshold, train.labels, train.true_labels)
            self.division_stats.update({f"{key.replace('kept', 'labelled')}{k + 1}": v for key, v in stats.items()})

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
        if epoch >= self.warmup:
            self.divide()

    # ---- steps --------------------------------------------------------------------------------
    def train_step(self, batch, clean):
        out = self.warmup_step(batch) if self.epoch < self.warmup else self.mixmatch_step(batch)
        self.step += 1
        return out

    def warmup_step(self, batch) -> StepOutput:
        logits = [m(batch.x) for m in self.models]
        losses = [F.cross_entropy(z, batch.y) + (confidence_penalty(z) if self.conf_penalty else 0) for z in logits]
        self._update(losses[0] + losses[1])
        mean = (F.softmax(logits[0].detach().float(), dim=1) + F.softmax(logits[1].detach().float(), dim=1)) / 2
        return StepOutput(loss=((losses[0] + losses[1]) / 2).detach(), logits=self._log(mean))

    def second_view(self, batch) -> torch.Tensor:
        """A fresh augmentation of the batch (torch's global generator, which the trainer reseeds
        every epoch); the batch itself when the dataset has no augmentation."""
        task = self.ctx.task
        if task.augmentation is None:
            return batch.x
        return task.batch("train", batch.index, augment=True, device=batch.x.device, offset=getattr(batch, "offset", 0),
                          whole_size=getattr(batch, "whole_size", None)).x  # fmt: skip

    @torch.no_grad()
    def view_predictions(self, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, train: bool):
        """(softmax on view 1, softmax averaged over both views) in train or eval mode; one
        forward when the views are the same tensor."""
        was_training = model.training
        model.train(train)
        try:
            p1 = F.softmax(model(x1).float(), dim=1)
            p2 = p1 if x2 is x1 else F.softmax(model(x2).float(), dim=1)
        finally:
            model.train(was_training)
        return p1, (p1 + p2) / 2

    def lambda_u_now(self) -> float:
        return linear_rampup(self.epoch + self.step / self.steps_per_epoch, self.warmup, self.lambda_u)

    def mixmatch_step(self, batch) -> StepOutput:
        x1, x2 = batch.x, self.second_view(batch)
        # (F.one_hot checks the labels' range on the host)
        onehot = torch.zeros(len(batch.y), self.ctx.num_classes, device=x1.device).scatter_(1, batch.y[:, None], 1.0)
        own = [self.view_predictions(m, x1, x2, train=True) for m in self.models]  # BatchNorm on the batch, as the code's net.train()
        peer = [self.view_predictions(m, x1, x2, train=False)[1] for m in self.models]  # the fixed peer: net2.eval()
        lambda_u = self.lambda_u_now()
        lams = self.beta.sample()
        lams = torch.maximum(lams, 1 - lams)
        inputs = torch.cat([x1, x2])
        total, stats = 0, {}
        for k, o in ((0, 1), (1, 0)):
            w = self.clean_prob[o][batch.index]  # co-divide: the peer's division
            labelled = w > self.p_threshold
            targets = refined_targets(own[k][1], peer[o], onehot, w, labelled, self.temperature)
            lam, perm = lams[k], torch.randperm(inputs.shape[0], device=inputs.device)
            mixed_x = lam * inputs + (1 - lam) * inputs[perm]
            both = torch.cat([targets, targets])
            mixed_t = lam * both + (1 - lam) * both[perm]
            loss, parts = semi_supervised_loss(self.models[k](mixed_x), mixed_t, torch.cat([labelled, labelled]), lambda_u)
            total = total + loss
            for key, value in parts.items():
                stats[key] = stats.get(key, 0) + value / 2
            stats[f"batch_labelled_frac{o + 1}"] = labelled.float().mean()
        self._update(total)
        return StepOutput(loss=(total / 2).detach(), stats=stats, logits=self._log((own[0][0] + own[1][0]) / 2))

    def _update(self, loss: torch.Tensor) -> None:
        self.opt1.zero_grad(set_to_none=True)
        self.opt2.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.opt1, self.opt2)  # disjoint graphs: each network its own gradient

    @staticmethod
    def _log(mean_probs: torch.Tensor) -> torch.Tensor:
        return torch.log(mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny)).detach()

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        record = {"dm_warmup_epoch": float(epoch < self.warmup), "lambda_u": self.lambda_u_now()}
        if epoch >= self.warmup:
            record.update(self.division_stats)
        return record

    def eval_model(self):
        return self.ensemble

    audit_default = "dividemix_noisy_posterior"

    def audit_signals(self):
        normalised = self.current_losses()
        clean = torch.stack([self.fit_division(normalised[k]) for k in range(2)])
        what = "a two-component GMM on the final network's normalised training losses"
        return {
            "dividemix_noisy_posterior": ExampleSignal(1 - clean.mean(dim=0), None, f"1 - the clean (low-loss) posterior averaged over both networks, each from {what}"),
            "dividemix_noisy_posterior1": ExampleSignal(1 - clean[0], None, f"1 - network 1's clean (low-loss) posterior, from {what}"),
            "dividemix_noisy_posterior2": ExampleSignal(1 - clean[1], None, f"1 - network 2's clean (low-loss) posterior, from {what}"),
        }
