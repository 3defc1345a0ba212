"""A two-component Gaussian mixture on one-dimensional values, fitted by EM: what DivideMix (on
per-example losses) and FINE (on per-class alignment scores) fit with
`sklearn.mixture.GaussianMixture(n_components=2)`, written here so that the package does not depend
on scikit-learn (not a method itself: nothing in families/ is registered).

The EM loop is scikit-learn's (`BaseMixture.fit_predict`, one initialisation): an E-step, an M-step,
and a stop when the mean log-likelihood (measured in the E-step, so for the parameters before
the M-step) changed by less than `tol`, or after `max_iter` iterations; `reg_covar` is added to
each variance. The initialisation differs in one way: scikit-learn starts from the clusters of a
k-means with a random k-means++ seed (`init_params="kmeans"`), this one from the exact 1-D 2-means
split (the cut of the sorted values with the smallest within-cluster sum of squares, the global
optimum of the k-means objective, which Lloyd's iterations from a k-means++ seed reach on
bimodal data), so a fit depends only on the values. docs/methods-baselines.md ("The
two-component GMM") has the details and the settings each method uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

# The settings of the authors' code: DivideMix (LiJunnan1992/DivideMix, eval_train) and FINE
# (Kthyeon/FINE_official, selection/gmm.py fit_mixture: tol 1e-6, max_iter 100, sklearn's default
# reg_covar 1e-6).
DIVIDEMIX_GMM = dict(max_iter=10, tol=1e-2, reg_covar=5e-4)
FINE_GMM = dict(max_iter=100, tol=1e-6, reg_covar=1e-6)

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GMMFit:
    """A fitted two-component mixture, components ordered by mean (0: the lower mean).

    weights, means, variances: float64 [2]; n_iter: EM iterations run; converged: the
    log-likelihood change fell below `tol` within `max_iter`; log_likelihood: the mean
    log-likelihood of the values under the fitted parameters."""

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    n_iter: int
    converged: bool
    log_likelihood: float

    def log_joint(self, values: torch.Tensor) -> torch.Tensor:
        """log(weight_k N(v; mean_k, variance_k)), float64 [n, 2]."""
        x = values.detach().to(torch.float64).reshape(-1, 1).cpu()
        return _log_joint(x, self.weights, self.means, self.variances)

    def posterior(self, values: torch.Tensor) -> torch.Tensor:
        """P(component k | v), float64 [n, 2] (CPU)."""
        return torch.softmax(self.log_joint(values), dim=1)


def two_means_split(values: torch.Tensor) -> torch.Tensor:
    """bool [n]: True for the values in the upper cluster of the exact 1-D 2-means split (the
    threshold between sorted values that minimises the within-cluster sum of squares; the first
    such cut on ties). Needs n >= 2."""
    x = values.detach().to(torch.float64).reshape(-1).cpu()
    n = x.numel()
    if n < 2:
        raise ValueError(f"a 2-means split needs at least 2 values, got {n}")
    order = torch.argsort(x, stable=True)
    s = x[order] - x.mean()  # centred: fewer cancellations in the sums of squares
    c1, c2 = torch.cumsum(s, 0), torch.cumsum(s * s, 0)
    k = torch.arange(1, n, dtype=torch.float64)  # size of the lower cluster
    left = c2[:-1] - c1[:-1] ** 2 / k
    right = (c2[-1] - c2[:-1]) - (c1[-1] - c1[:-1]) ** 2 / (n - k)
    cut = int(torch.argmin(left + right)) + 1
    upper = torch.zeros(n, dtype=torch.bool)
    upper[order[cut:]] = True
    return upper


def _log_joint(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    return torch.log(weights) - 0.5 * (_LOG_2PI + torch.log(variances) + (x - means) ** 2 / variances)


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float):
    """scikit-learn's `_estimate_gaussian_parameters` for one feature: responsibilities [n, 2] ->
    weights, means, variances (each [2])."""
    nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps
    means = (resp * x).sum(0) / nk
    variances = (resp * (x - means) ** 2).sum(0) / nk + reg_covar
    return nk / nk.sum(), means, variances


def fit_two_component_gmm(
    values: torch.Tensor, *, max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6
) -> Tuple[torch.Tensor, GMMFit]:
    """Fit a two-component 1-D Gaussian mixture to `values` [n] (n >= 2; any device; the fit runs
    in float64 on the CPU) by EM from the exact 2-means split. Returns (the posterior of the
    lower-mean component for each value, float64 [n] on the CPU; the fit). Defaults are
    scikit-learn's; DIVIDEMIX_GMM and FINE_GMM hold the authors' settings."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x = values.detach().to(torch.float64).reshape(-1, 1).cpu()
    if x.shape[0] < 2:
        raise ValueError(f"a two-component mixture needs at least 2 values, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError("values to fit a mixture to must be finite")
    upper = two_means_split(x)
    resp = torch.stack([(~upper).double(), upper.double()], dim=1)
    weights, means, variances = _m_step(x, resp, reg_covar)
    lower_bound, converged, n_iter = -math.inf, False, 0
    for n_iter in range(1, max_iter + 1):
        previous = lower_bound
        log_joint = _log_joint(x, weights, means, variances)
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        weights, means, variances = _m_step(x, torch.exp(log_joint - log_norm), reg_covar)
        lower_bound = float(log_norm.mean())
        if abs(lower_bound - previous) < tol:
            converged = True
            break
    log_joint = _log_joint(x, weights, means, variances)
    order = torch.argsort(means, stable=True)
    fit = GMMFit(weights[order], means[order], variances[order], n_iter, converged,
                 float(torch.logsumexp(log_joint, dim=1).mean()))  # fmt: skip
    posterior = torch.softmax(log_joint, dim=1)[:, order[0]]
    return posterior, fit
