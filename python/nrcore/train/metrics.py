"""Evaluation and the statistics the trainer logs."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Dict[str, float]:
    """Accuracy and mean cross-entropy on a loader, in eval mode (BatchNorm running statistics
    untouched); the model's previous mode is restored. One host sync at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    total = 0
    try:
        for batch in loader:
            logits = model(batch.x)
            correct = correct.to(logits.device) + (logits.argmax(1) == batch.y).sum()
            loss_sum = loss_sum.to(logits.device) + nn.functional.cross_entropy(logits.float(), batch.y, reduction="sum").double()
            total += len(batch)
    finally:
        model.train(was_training)
    if total == 0:
        return {"acc": float("nan"), "loss": float("nan")}
    return {"acc": 100.0 * correct.item() / total, "loss": loss_sum.item() / total}


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve of `scores` for separating `positive` (bool) from the rest, with
    ties counted as one half (Mann-Whitney U). None when one class is empty."""
    scores = scores.detach().double().flatten().cpu()
    positive = positive.detach().bool().flatten().cpu()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average ranks over ties
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    ranks[order] = avg_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def weight_stats(weights: torch.Tensor, is_noisy: torch.Tensor) -> Dict[str, Optional[float]]:
    """Mean weight of clean and of noisy training examples, and the AUROC of the weights for
    telling clean (positive) from noisy. Uses the true labels: analysis only."""
    w = weights.detach().double().cpu()
    noisy = is_noisy.bool().cpu()
    out: Dict[str, Optional[float]] = {
        "weight_mean_clean": float(w[~noisy].mean()) if (~noisy).any() else None,
        "weight_mean_noisy": float(w[noisy].mean()) if noisy.any() else None,
        "weight_auroc": auroc(w, ~noisy),
    }
    return out
