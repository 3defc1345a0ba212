"""The statistics the trainer logs about per-example weights (evaluation: nrcore.models.inference)."""

from __future__ import annotations

from typing import Dict, Optional

import torch


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
