"""Running a model over a split: evaluation (accuracy and loss), predicted class probabilities,
and penultimate features. Below the methods and the trainer, which both use it, as do bench/
scripts and analyses of finished runs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nrcore.models.functional import functional_forward, trainable_params
from nrcore.parallel import Ranks


@torch.no_grad()
def evaluate(model: nn.Module, loader, ranks: Optional[Ranks] = None) -> Dict[str, float]:
    """Accuracy and mean cross-entropy on a loader, in eval mode (BatchNorm running statistics
    untouched); the model's previous mode is restored. One host sync at the end. Under torchrun
    (`ranks`, with a loader of this rank's slices) the counts are summed over the ranks."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    try:
        for batch in loader:
            if len(batch) == 0:  # a rank's empty slice of a short last batch
                continue
            logits = model(batch.x)
            correct += (logits.argmax(1) == batch.y).sum()
            loss_sum += F.cross_entropy(logits.float(), batch.y, reduction="sum").double()
            total += len(batch)
    finally:
        model.train(was_training)
    sums = torch.stack([correct, loss_sum, torch.tensor(float(total), dtype=torch.float64, device=device)])
    if ranks is not None:
        sums = ranks.sum(sums)
    correct, loss_sum, total = sums.tolist()
    if total == 0:
        return {"acc": float("nan"), "loss": float("nan")}
    return {"acc": 100.0 * correct / total, "loss": loss_sum / total}


@torch.no_grad()
def predict(model: torch.nn.Module, loader) -> Tuple[torch.Tensor, torch.Tensor]:
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
    return predict(model, task.loader(split, batch_size, device=device))


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
    return predict(model, loader)


def split_batches(task, split: str, batch_size: int, device):
    """A whole split in order, without augmentation, in batches of about `batch_size` and as
    equal as possible (so a train-mode BatchNorm never normalises a last batch of one example)."""
    n = len(task.split(split))
    count = -(-n // batch_size)
    return task.loader(split, -(-n // count), device=device)


@torch.no_grad()
def split_features(model: nn.Module, task, split: str, batch_size: int, device) -> tuple:
    """Penultimate features [N, d] and labels [N] of a whole split, in order, without
    augmentation. The model runs in train mode (batch statistics of each batch, as in the
    training forward) on throw-away BatchNorm buffers, so running statistics stay untouched."""
    named = trainable_params(model)
    feats, labels = [], []
    for batch in split_batches(task, split, batch_size, device):
        feats.append(functional_forward(model, named, batch.x, return_features=True)[1])
        labels.append(batch.y)
    return torch.cat(feats), torch.cat(labels)
