"""The two-component 1-D Gaussian mixture (nrcore.methods.families.mixture) that DivideMix and FINE
fit: its initial split, EM's fixed points on cases whose answer is known in closed form, the
posterior formula, the stopping rule, and (where scikit-learn is installed) agreement with
`sklearn.mixture.GaussianMixture`, which the authors' code calls."""

import math

import pytest
import torch

from nrcore.methods.families.mixture import DIVIDEMIX_GMM, FINE_GMM, fit_two_component_gmm, two_means_split


def normal_grid(mean: float, std: float, n: int) -> torch.Tensor:
    """n values whose empirical distribution is N(mean, std^2) quantised: mean + std * Phi^-1((i + 1/2) / n)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return mean + std * math.sqrt(2) * torch.erfinv(2 * u - 1)


def test_the_initial_split_is_the_exact_two_means_cut():
    # cuts of the sorted values [0, 1, 2, 10, 11]: within-cluster sums of squares
    # after 0: 0 + 74.75 (mean 8.5 of 1, 2, 10, 11); after 1: 0.5 + 50; after 2: 2 + 0.5; after 10: 62 + 0
    values = torch.tensor([10.0, 0.0, 11.0, 2.0, 1.0])
    assert two_means_split(values).tolist() == [True, False, True, False, False]
    # [0, 1] | [2, 3] costs 0.5 + 0.5, either outer cut 0 + 2; equal values tie every cut: the first wins
    assert two_means_split(torch.tensor([3.0, 2.0, 1.0, 0.0])).tolist() == [True, True, False, False]
    assert two_means_split(torch.full((3,), 7.0)).tolist() == [False, True, True]
    with pytest.raises(ValueError, match="at least 2"):
        two_means_split(torch.tensor([1.0]))


def test_well_separated_clusters_give_their_sample_moments():
    """Clusters 20 standard deviations apart: every responsibility is 0 or 1 to double precision,
    so EM's fixed point is each cluster's share, mean and (biased) variance plus reg_covar."""
    low, high = normal_grid(0.0, 1.0, 300), normal_grid(20.0, 2.0, 700)
    values = torch.cat([high[:350], low, high[350:]])
    posterior, fit = fit_two_component_gmm(values, max_iter=100, tol=1e-10, reg_covar=1e-6)
    assert fit.converged and fit.n_iter <= 3
    torch.testing.assert_close(fit.weights, torch.tensor([0.3, 0.7], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fit.means, torch.stack([low.mean(), high.mean()]), rtol=0, atol=1e-12)
    by_hand = torch.stack([low.var(unbiased=False), high.var(unbiased=False)]) + 1e-6
    torch.testing.assert_close(fit.variances, by_hand, rtol=1e-12, atol=0)
    # and the sample moments are the generating ones up to the grid's quantisation
    torch.testing.assert_close(fit.means, torch.tensor([0.0, 20.0], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.variances, torch.tensor([1.0, 4.0], dtype=torch.float64), rtol=0.01, atol=0)
    assert posterior.dtype == torch.float64 and posterior.shape == (1000,)
    assert torch.equal(posterior > 0.5, values < 10)


def test_overlapping_clusters_are_recovered_to_tolerance():
    # two components 3 sd apart overlap by about 7%; the maximum-likelihood fit of 20,000 grid points is the truth
    values = torch.cat([normal_grid(1.0, 1.0, 6000), normal_grid(4.0, 0.5, 14000)])
    _, fit = fit_two_component_gmm(values, max_iter=500, tol=1e-12, reg_covar=0.0)
    torch.testing.assert_close(fit.weights, torch.tensor([0.3, 0.7], dtype=torch.float64), rtol=0, atol=0.01)
    torch.testing.assert_close(fit.means, torch.tensor([1.0, 4.0], dtype=torch.float64), rtol=0, atol=0.02)
    torch.testing.assert_close(fit.variances.sqrt(), torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=0, atol=0.02)


def test_a_symmetric_sample_has_posterior_one_half_at_its_centre():
    half = normal_grid(0.2, 0.08, 500)  # all below 0.5
    values = torch.cat([half, 1 - half])  # mirror images about 0.5
    posterior, fit = fit_two_component_gmm(values, **DIVIDEMIX_GMM)
    torch.testing.assert_close(fit.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(fit.means.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(fit.variances[0], fit.variances[1])
    torch.testing.assert_close(fit.posterior(torch.tensor([0.5]))[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(posterior[:500], 1 - posterior[500:])  # mirrored values, mirrored posteriors
    assert torch.all(posterior[:500] > 0.5)


def test_the_posterior_is_bayes_rule_on_the_fitted_parameters():
    values = torch.tensor([0.05, 0.1, 0.12, 0.2, 0.3, 0.7, 0.8, 0.85, 0.9, 0.95])
    posterior, fit = fit_two_component_gmm(values, **DIVIDEMIX_GMM)
    w, m, v = fit.weights.tolist(), fit.means.tolist(), fit.variances.tolist()

    def density(x, k):
        return w[k] * math.exp(-((x - m[k]) ** 2) / (2 * v[k])) / math.sqrt(2 * math.pi * v[k])

    by_hand = [density(x, 0) / (density(x, 0) + density(x, 1)) for x in values.double().tolist()]
    torch.testing.assert_close(posterior, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert fit.means[0] < fit.means[1]  # component 0 is the lower mean: the posterior falls with the value
    assert torch.all(posterior[1:] <= posterior[:-1])


def test_em_stops_at_max_iter_or_when_the_likelihood_settles():
    values = torch.cat([normal_grid(0.2, 0.1, 200), normal_grid(0.6, 0.2, 100)])
    _, one = fit_two_component_gmm(values, max_iter=1, tol=1e-3)
    assert (one.n_iter, one.converged) == (1, False)  # the first change is measured from -inf
    _, loose = fit_two_component_gmm(values, max_iter=10, tol=1e9)
    assert (loose.n_iter, loose.converged) == (2, True)  # the second change is finite, below any huge tol
    _, tight = fit_two_component_gmm(values, max_iter=1000, tol=1e-12)
    assert tight.converged and tight.n_iter > 2
    assert tight.log_likelihood >= loose.log_likelihood - 1e-12  # EM never lowers the likelihood


def test_constant_values_give_a_finite_fit_and_bad_input_is_refused():
    posterior, fit = fit_two_component_gmm(torch.full((10,), 0.3), reg_covar=5e-4)
    assert torch.isfinite(posterior).all()
    torch.testing.assert_close(fit.variances, torch.full((2,), 5e-4, dtype=torch.float64))  # only the regulariser
    with pytest.raises(ValueError, match="at least 2 values"):
        fit_two_component_gmm(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="finite"):
        fit_two_component_gmm(torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="max_iter"):
        fit_two_component_gmm(torch.tensor([1.0, 2.0]), max_iter=0)


@pytest.mark.parametrize("settings", [DIVIDEMIX_GMM, FINE_GMM], ids=["dividemix", "fine"])
def test_matches_scikit_learn_on_bimodal_data(settings):
    mixture = pytest.importorskip("sklearn.mixture")
    g = torch.Generator().manual_seed(0)
    for seed in range(3):
        # a DivideMix-like loss distribution: many small (clean) and fewer large (noisy) losses in [0, 1]
        values = torch.cat([torch.rand(700, generator=g) ** 4 * 0.3, 0.5 + 0.5 * torch.rand(300, generator=g)]).double()
        posterior, fit = fit_two_component_gmm(values, **settings)
        reference = mixture.GaussianMixture(n_components=2, random_state=seed, **settings).fit(values.numpy()[:, None])
        expected = reference.predict_proba(values.numpy()[:, None])[:, reference.means_.argmin()]
        assert fit.n_iter == reference.n_iter_
        torch.testing.assert_close(posterior, torch.from_numpy(expected), rtol=0, atol=1e-6)
        torch.testing.assert_close(fit.means, torch.from_numpy(reference.means_.ravel()).sort().values, rtol=0, atol=1e-8)
