"""The baselines' losses, selection rules and transition estimators on hand-made tensors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nrcore.methods.families.selection import cross_update_losses, forget_rate_at, small_loss_mask
from nrcore.methods.families.transition import anchor_point_transition, class_mean_transition, clean_label_posterior, forward_corrected_nll
from nrcore.methods.bootstrap import bootstrap_loss

T3 = torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.6, 0.4], [0.5, 0.0, 0.5]], dtype=torch.float64)


def _logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


# ---- forward correction ---------------------------------------------------------------------
def test_forward_loss_scores_the_noisy_label_under_the_noise_process():
    logits = _logits_of([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    loss = forward_corrected_nll(logits, torch.tensor([0, 1, 2]), T3)
    # p^T T = [0.7*0.8 + 0.1*0.5, 0.7*0.2 + 0.2*0.6, 0.2*0.4 + 0.1*0.5] = [0.61, 0.26, 0.13]
    expected = -torch.log(torch.tensor([0.61, 0.26, 0.13]))
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)


def test_forward_loss_with_identity_is_cross_entropy_and_zero_columns_stay_finite():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(forward_corrected_nll(logits, labels, torch.eye(4)), F.cross_entropy(logits, labels, reduction="none"))
    never_observed = torch.eye(3)
    never_observed[2, 2] = 0.0
    never_observed[2, 0] = 1.0  # class 2 always shows up as 0: no row puts mass on column 2
    loss = forward_corrected_nll(torch.zeros(1, 3), torch.tensor([2]), never_observed)
    assert torch.isfinite(loss).all() and loss.item() > 20


# ---- anchor points (Patrini et al.) ---------------------------------------------------------
def test_anchor_points_recover_the_transition_on_a_constructed_example():
    # noisy posteriors are T^T applied to clean posteriors; one perfect example per class exists
    torch.manual_seed(0)
    clean = torch.softmax(torch.randn(40, 3), dim=1)
    clean = torch.cat([clean, torch.eye(3)])  # the anchors
    noisy = clean.double() @ T3
    estimate = anchor_point_transition(noisy, percentile=100)
    torch.testing.assert_close(estimate, T3)


def test_anchor_point_argmax_and_row_normalisation_by_hand():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]], dtype=torch.float64)
    probs[3] *= 2  # unnormalised row: the estimate normalises rows
    estimate = anchor_point_transition(probs, percentile=100)
    torch.testing.assert_close(estimate, torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64))


def test_anchor_point_percentile_skips_outliers_and_matches_the_authors_rule():
    column = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    probs = torch.stack([column, 1 - column], dim=1)
    # 50th percentile ("higher"): 0.5; the anchor is the largest value strictly below it: 0.3
    torch.testing.assert_close(anchor_point_transition(probs, percentile=50)[0], torch.tensor([0.3, 0.7], dtype=torch.float64))

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5) * 0.3, size=333)
    for q in (97.0, 90.0, 50.0):
        expected = np.empty((5, 5))
        for i in range(5):  # the authors' NoiseEstimator.fit, on a copy
            eta = probs[:, i].copy()
            eta[eta >= np.percentile(eta, q, method="higher")] = 0.0
            expected[i] = probs[np.argmax(eta)]
        expected /= expected.sum(axis=1, keepdims=True)
        before = torch.from_numpy(probs.copy())
        got = anchor_point_transition(before, percentile=q)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
        assert torch.equal(before, torch.from_numpy(probs))  # input untouched


# ---- GLC's class means ----------------------------------------------------------------------
def test_glc_estimate_is_the_mean_prediction_per_trusted_class():
    probs = torch.tensor([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.3, 0.3, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    estimate = class_mean_transition(probs, labels, num_classes=3)
    # class 2 has no trusted example: identity row
    expected = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.6, 0.2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(estimate, expected)


# ---- small-loss selection (Co-teaching, Co-teaching+) ---------------------------------------
def test_forget_rate_ramps_linearly_over_num_gradual_epochs():
    rates = [forget_rate_at(e, 0.5, 10) for e in range(13)]
    assert rates == pytest.approx([0.05 * e for e in range(11)] + [0.5, 0.5])
    assert [forget_rate_at(e, 0.5, 10, exponent=2.0) for e in (0, 1, 3, 4)] == pytest.approx([0.0, 0.05, 0.45, 0.5])
    assert forget_rate_at(0, 0.3, 0) == 0.3


def test_small_loss_mask_keeps_the_smallest_losses():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert small_loss_mask(losses, 0.6).tolist() == [True, True, False, True, False]  # ceil(3.0) = 3
    assert small_loss_mask(losses, 0.5).tolist() == [True, True, False, True, False]  # ceil(2.5) = 3
    assert small_loss_mask(losses, 0.2).tolist() == [False, True, False, False, False]
    assert small_loss_mask(losses, 0.0).sum() == 0
    # (1 - 0.8) * 100 is 19.999999999999996 in floating point: keep exactly 20
    assert int(small_loss_mask(torch.rand(100), 1 - 0.8).sum()) == 20


def test_small_loss_mask_among_candidates_only():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    candidates = torch.tensor([True, False, True, True, False])
    # two of the three candidates (ceil 1.5): 0.3 and 0.5; the smaller non-candidate 0.1 is never kept
    assert small_loss_mask(losses, 0.5, candidates).tolist() == [True, False, False, True, False]
    assert small_loss_mask(losses, 1.0, torch.zeros(5, dtype=torch.bool)).sum() == 0


def test_cross_update_trains_each_network_on_its_peers_selection_averaged_once():
    labels = torch.tensor([0, 0, 0, 0])
    # network 1 is confident on examples 0 and 1, network 2 on examples 2 and 3
    p1 = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]]
    p2 = [[0.2, 0.8], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]]
    loss1, loss2, picked1, picked2 = cross_update_losses(_logits_of(p1), _logits_of(p2), labels, keep_fraction=0.5)
    assert picked1.tolist() == [True, True, False, False] and picked2.tolist() == [False, False, True, True]
    # network 1 learns from network 2's picks (its own large losses), once averaged
    assert loss1.item() == pytest.approx(-(math.log(0.3) + math.log(0.2)) / 2)
    assert loss2.item() == pytest.approx(-(math.log(0.2) + math.log(0.3)) / 2)


def test_cross_update_on_an_empty_disagreement_set_is_zero():
    logits = torch.randn(4, 3, requires_grad=True)
    loss1, loss2, picked1, _ = cross_update_losses(logits, logits * 2, torch.tensor([0, 1, 2, 0]), 0.7, torch.zeros(4, dtype=torch.bool))
    assert loss1.item() == 0 and loss2.item() == 0 and picked1.sum() == 0
    (loss1 + loss2).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---- bootstrapping (Reed et al.) ------------------------------------------------------------
def test_bootstrap_soft_and_hard_by_hand():
    logits = _logits_of([[0.7, 0.2, 0.1]]).float()
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    soft = bootstrap_loss(logits, torch.tensor([1]), 0.95, "soft")
    assert soft.item() == pytest.approx(0.95 * -math.log(0.2) + 0.05 * entropy, rel=1e-5)
    hard = bootstrap_loss(logits, torch.tensor([1]), 0.8, "hard")  # argmax is class 0
    assert hard.item() == pytest.approx(0.8 * -math.log(0.2) + 0.2 * -math.log(0.7), rel=1e-5)
    agree = bootstrap_loss(logits, torch.tensor([0]), 0.8, "hard")
    assert agree.item() == pytest.approx(-math.log(0.7), rel=1e-5)
    with pytest.raises(ValueError):
        bootstrap_loss(logits, torch.tensor([0]), 0.8, "medium")


def test_bootstrap_soft_differentiates_through_the_prediction_in_the_target():
    # Reed et al.: soft bootstrapping = cross-entropy + (1 - beta) * entropy (minimum-entropy
    # regularisation); a detached target would drop the entropy term's gradient
    logits = torch.tensor([[1.0, -0.5, 0.3]], requires_grad=True)
    bootstrap_loss(logits, torch.tensor([2]), 0.9, "soft").sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    q = torch.softmax(reference, dim=1)
    (0.9 * F.cross_entropy(reference, torch.tensor([2])) - 0.1 * (q * q.log()).sum()).backward()
    torch.testing.assert_close(logits.grad, reference.grad)
    detached = logits.detach().clone().requires_grad_(True)
    log_q = F.log_softmax(detached, dim=1)
    target = 0.9 * F.one_hot(torch.tensor([2]), 3) + 0.1 * log_q.exp().detach()
    (-(target * log_q).sum()).backward()
    assert not torch.allclose(detached.grad, logits.grad)


def test_clean_label_posterior_is_bayes_rule_under_the_noise_model():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    post = clean_label_posterior(probs, labels, T3)
    # example 0, given 1: p(j) T[j, 1] = [0.6*0.2, 0.3*0.6, 0.1*0.0] = [0.12, 0.18, 0] -> [0.4, 0.6, 0]
    torch.testing.assert_close(post[0], torch.tensor([0.4, 0.6, 0.0], dtype=torch.float64))
    # example 1, given 2: [0.2*0.0, 0.2*0.4, 0.6*0.5] = [0, 0.08, 0.30] -> [0, 0.2105, 0.7895]
    torch.testing.assert_close(post[1], torch.tensor([0.0, 0.08, 0.30], dtype=torch.float64) / 0.38)
    never = torch.eye(3, dtype=torch.float64)
    never[:, 2] = 0.0  # no class shows up as label 2: the model's posterior stands
    torch.testing.assert_close(clean_label_posterior(probs, labels, never)[1], probs[1])
