"""FINE and DivideMix: their rules on hand-made tensors against by-hand computations, one step of
each against the formulas, `Task.batch` (DivideMix's second view), option errors through the CLI,
and tiny digits runs end to end (learning, metrics, audit signals, exact resume)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nrcore.data.noise import NoiseSpec
from nrcore.data.types import Augmentation, Split
from nrcore.methods import MethodContext, OptimConfig, registry
from nrcore.methods.dividemix import (
    AveragedPair, confidence_penalty, linear_rampup, min_max, paper_defaults, refined_targets, semi_supervised_loss, sharpen,
)  # fmt: skip
from nrcore.methods.families.mixture import FINE_GMM, fit_two_component_gmm
from nrcore.methods.fine import alignment_scores, clean_posterior, fine_selection, principal_directions, selection_stats
from nrcore.models import build_model
from nrcore.train.sync_guard import no_host_sync


def build(task, name, **options):
    """A method on `task` as the trainer builds it (cnn, SGD lr 0.05, batch 32), from a fixed seed."""
    cls = registry()[name]
    ctx = MethodContext(task, "cpu", lambda: build_model("cnn", task.input_shape, task.num_classes),
                        OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4), epochs=4, batch_size=32, seed=0)  # fmt: skip
    torch.manual_seed(0)
    return cls(ctx, **{**{o.name: o.default for o in cls.options}, **options})


def first_batch(task, size=32, seed=1):
    return next(iter(task.loader("train", size, shuffle=True, generator=torch.Generator().manual_seed(seed))))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def auroc(score, positive):
    """P(score of a positive > score of a negative), ties one half (by counting pairs)."""
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


# ---- FINE: the rule ---------------------------------------------------------------------------


def test_fine_directions_are_the_top_eigenvector_of_the_basis_gram_matrix():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 2.0], [0.1, 3.0]])
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    every = torch.ones(7, dtype=torch.bool)
    # class 0: Gram matrix [[14, 1], [1, 2]], eigenvalues 8 +- sqrt(37); top eigenvector (1, sqrt(37) - 6) normalised
    top = torch.tensor([1.0, math.sqrt(37) - 6], dtype=torch.float64)
    u = principal_directions(feats, labels, 3, every)
    torch.testing.assert_close(u[0].abs(), top / top.norm())
    assert torch.equal(u[2], torch.zeros(2, dtype=torch.float64))  # a class without examples
    s = alignment_scores(feats, labels, u, "abs")
    unit = feats.double() / feats.double().norm(dim=1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(s[:5], (unit[:5] @ (top / top.norm())).abs())
    assert s[4] == 0  # a zero feature scores 0
    torch.testing.assert_close(alignment_scores(feats, labels, u, "square"), s**2)
    # the basis decides the direction: class 0 from its (0, 1) example only
    only = torch.tensor([False, True, False, False, False, False, False])
    u_only = principal_directions(feats, labels, 3, only)
    torch.testing.assert_close(u_only[0].abs(), torch.tensor([0.0, 1.0], dtype=torch.float64))
    # class 1 has no example in that basis: all its examples are used
    torch.testing.assert_close(u_only[1], u[1])
    with pytest.raises(ValueError, match="--fine-score"):
        alignment_scores(feats, labels, u, "cube")


def test_fine_posteriors_are_fitted_per_class_on_the_high_component():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([0.9 + 0.05 * torch.rand(20, generator=g), 0.3 + 0.15 * torch.rand(10, generator=g),  # class 0: clean 0.9
                        0.35 + 0.05 * torch.rand(12, generator=g), 0.1 * torch.rand(6, generator=g),  # class 1: clean 0.35-0.4
                        torch.tensor([0.3])]).double()  # class 2: one example  # fmt: skip
    labels = torch.tensor([0] * 30 + [1] * 18 + [2])
    p = clean_posterior(scores, labels, 3)
    for c, rows in ((0, slice(0, 30)), (1, slice(30, 48))):
        low, _ = fit_two_component_gmm(scores[rows], **FINE_GMM)
        torch.testing.assert_close(p[rows], 1 - low)
    assert p[48] == 1  # a class of one cannot be fitted: kept
    # per class, not pooled: class 1's clean examples (0.35-0.4) are its high component, while
    # among all the scores they fall in the low one, with class 0's noisy examples
    assert torch.all(p[30:42] > 0.5)
    pooled = 1 - fit_two_component_gmm(scores[:48], **FINE_GMM)[0]
    assert torch.all(pooled[30:42] < 0.5)


def test_fine_keeps_examples_strictly_above_the_threshold():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [0.1, 1.0], [0.95, 0.0]])
    labels = torch.zeros(6, dtype=torch.long)
    p, keep = fine_selection(feats, labels, 1, torch.ones(6, dtype=torch.bool), threshold=0.5)
    assert torch.equal(keep, p > 0.5)
    assert keep.tolist() == [True, True, True, False, False, True]
    _, none = fine_selection(feats, labels, 1, torch.ones(6, dtype=torch.bool), threshold=float(p.max()))
    assert not none.any()


def test_selection_stats_by_hand():
    keep = torch.tensor([True, True, False, False, True])
    labels = torch.tensor([0, 1, 2, 3, 4])
    true = torch.tensor([0, 2, 2, -1, -1])  # -1: unknown
    # known rows 0-2; right: 0, 2; kept and known: 0, 1 -> precision 1/2; right and kept: 0 of right {0, 2} -> recall 1/2
    assert selection_stats(keep, labels, true) == {"kept_frac": 0.6, "label_precision": 0.5, "clean_recall": 0.5}
    assert selection_stats(keep, labels, torch.full((5,), -1)) == {"kept_frac": 0.6}


# ---- FINE: the method -------------------------------------------------------------------------


def test_fine_selects_after_the_warmup_then_every_few_epochs():
    fine = SimpleNamespace(warmup=2, every=3)
    from nrcore.methods.fine import FINE

    assert [e for e in range(12) if FINE.selects_at(fine, e)] == [2, 5, 8, 11]
    fine.every = 1
    assert [e for e in range(5) if FINE.selects_at(fine, e)] == [2, 3, 4]


def test_a_fine_step_is_cross_entropy_over_the_kept_examples_only(digits_task):
    first = build(digits_task, "fine")
    g = torch.Generator().manual_seed(4)
    keep = (torch.rand(len(digits_task.train), generator=g) < 0.5).float()
    first.keep.copy_(keep)
    batch = first_batch(digits_task)
    second = copy.deepcopy(first)
    out = first.train_step(batch, None)
    ce = F.cross_entropy(out.logits, batch.y, reduction="none")
    kept = keep[batch.index]
    assert 0 < kept.sum() < len(batch)
    torch.testing.assert_close(out.loss, (ce * kept).sum() / kept.sum())
    # the labels of the dropped examples do not matter: the same update with them changed
    relabelled = dataclasses.replace(batch, y=torch.where(kept > 0, batch.y, (batch.y + 1) % 10))
    second.train_step(relabelled, None)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fine_learns_on_digits_and_its_selection_is_cleaner_than_the_labels(run_tiny):
    summary, run_dir = run_tiny("fine", noise="sym50", epochs=3, fine_warmup=1, fine_every=1)
    assert summary["test_acc_last"] > 60  # chance 10%
    rec = records(run_dir)
    assert [r["fine_selected"] for r in rec] == [0, 1, 1]
    assert rec[0]["kept_frac"] == 1 and rec[0]["label_precision"] == pytest.approx(0.5, abs=0.03)  # sym50: half the labels
    for r in rec[1:]:
        assert 0.2 < r["kept_frac"] < 0.8 and r["label_precision"] > 0.8
    audit = np.load(run_dir / "audit.npz")
    assert json.loads(str(audit["meta"]))["default"] == "fine_noisy_posterior"
    score = audit["fine_noisy_posterior__score"]
    assert np.all((score >= 0) & (score <= 1)) and 0.2 < np.mean(score > 0.5) < 0.8


def test_fine_audit_scores_separate_the_noisy_examples(tmp_path, tiny_config, digits_task):
    from nrcore.data import build_task
    from nrcore.train import train

    cfg = tiny_config("fine", noise="sym50", epochs=3, fine_warmup=1, fine_every=1)
    train(cfg, tmp_path / "run")
    task = build_task("digits", noise="sym50", clean_size=100, val_size=100, seed=0)
    score = np.load(tmp_path / "run" / "audit.npz")["fine_noisy_posterior__score"]
    assert len(score) == len(task.train)
    assert auroc(score, task.train.is_noisy.numpy()) > 0.85  # the noisy examples score higher


def test_fine_resumes_exactly_with_its_selection_from_the_checkpoint(tmp_path, tiny_config):
    """One selection, at epoch 2 (of 3); the run stops after it, so epoch 3 trains on the
    checkpointed selection."""
    from nrcore.train import train

    cfg = tiny_config("fine", noise="sym50", epochs=3, fine_warmup=1, fine_every=5)
    full = train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "split", stop_after_epoch=2)
    split = train(cfg, tmp_path / "split", resume=True)
    assert split["test_acc_last"] == full["test_acc_last"]
    a, b = records(tmp_path / "full"), records(tmp_path / "split")
    assert [r["fine_selected"] for r in a] == [0, 1, 0]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_acc", "kept_frac", "label_precision"):
            assert ra[key] == rb[key], (key, ra["epoch"])
    assert a[2]["kept_frac"] == a[1]["kept_frac"] < 1


# ---- DivideMix: the rules ---------------------------------------------------------------------


def _task(classes, noise):
    return SimpleNamespace(num_classes=classes, noise=NoiseSpec.parse(noise))


@pytest.mark.parametrize(
    "classes,noise,warmup,lambda_u,tau,window,penalty",
    [
        (10, "sym20", 10, 0.0, 0.5, 1, False), (10, "sym50", 10, 25.0, 0.5, 1, False), (10, "unif80", 10, 25.0, 0.5, 1, False),
        (10, "sym90", 10, 50.0, 0.6, 5, False), (10, "asym40", 10, 0.0, 0.5, 1, True), (10, "pair40", 10, 0.0, 0.5, 1, True),
        (100, "sym20", 30, 25.0, 0.5, 1, False), (100, "sym50", 30, 150.0, 0.5, 1, False), (100, "sym90", 30, 150.0, 0.6, 5, False),
        (10, "clean", 10, 25.0, 0.5, 1, False), (10, "aggre", 10, 25.0, 0.5, 1, False), (14, "real", 10, 0.0, 0.5, 1, True),
    ],
)  # fmt: skip
def test_dividemix_defaults_follow_the_paper_table(classes, noise, warmup, lambda_u, tau, window, penalty):
    assert paper_defaults(_task(classes, noise)) == dict(warmup=warmup, lambda_u=lambda_u, p_threshold=tau, loss_window=window,
                                                         conf_penalty=penalty)  # fmt: skip


def test_sharpening_refinement_and_guessing_by_hand():
    torch.testing.assert_close(sharpen(torch.tensor([[0.6, 0.4]]), 0.5), torch.tensor([[0.36 / 0.52, 0.16 / 0.52]]))
    own = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    peer = torch.tensor([[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    onehot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    w = torch.tensor([0.8, 0.3])
    labelled = torch.tensor([True, False])
    t = refined_targets(own, peer, onehot, w, labelled, 0.5)
    row0 = torch.tensor([0.8 + 0.2 * 0.5, 0.2 * 0.3, 0.2 * 0.2]) ** 2  # w y + (1 - w) own, squared (T = 1/2)
    row1 = torch.tensor([0.2, 0.2, 0.6]) ** 2  # (own + peer) / 2, squared; the label and w play no part
    torch.testing.assert_close(t, torch.stack([row0 / row0.sum(), row1 / row1.sum()]))


def test_the_semi_supervised_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0], [1.0, -1.0, 0.0]])
    targets = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.0, 0.5, 0.5], [0.3, 0.3, 0.4]])
    labelled = torch.tensor([True, False, True, False])
    loss, parts = semi_supervised_loss(logits, targets, labelled, 3.0)
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    t = targets.tolist()
    lx = sum(-sum(t[i][c] * math.log(p[i][c]) for c in range(3)) for i in (0, 2)) / 2
    lu = sum(sum((p[i][c] - t[i][c]) ** 2 for c in range(3)) / 3 for i in (1, 3)) / 2
    mean = [sum(p[i][c] for i in range(4)) / 4 for c in range(3)]
    penalty = sum(math.log((1 / 3) / mean[c]) / 3 for c in range(3))
    assert parts["dm_lx"].item() == pytest.approx(lx, rel=1e-6)
    assert parts["dm_lu"].item() == pytest.approx(lu, rel=1e-6)
    assert parts["dm_penalty"].item() == pytest.approx(penalty, rel=1e-5)
    assert loss.item() == pytest.approx(lx + 3.0 * lu + penalty, rel=1e-6)
    # no unlabelled row: L_u is 0, not NaN
    _, only = semi_supervised_loss(logits, targets, torch.ones(4, dtype=torch.bool), 3.0)
    assert only["dm_lu"].item() == 0


def test_penalty_ramp_and_normalisation_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    assert confidence_penalty(logits).item() == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert [linear_rampup(e, 10, 25.0) for e in (9.5, 10, 14, 26, 40)] == [0.0, 0.0, 6.25, 25.0, 25.0]
    torch.testing.assert_close(min_max(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(min_max(torch.full((3,), 7.0)), torch.zeros(3))


def test_the_evaluated_model_averages_both_networks_probabilities():
    torch.manual_seed(0)
    a, b = build_model("cnn", (1, 8, 8), 10), build_model("cnn", (1, 8, 8), 10)
    pair = AveragedPair(a, b).eval()
    assert not a.training and not b.training  # eval() reaches both networks
    x = torch.randn(5, 1, 8, 8)
    logits, feats = pair(x, return_features=True)
    torch.testing.assert_close(F.softmax(logits, dim=1), (F.softmax(a(x), dim=1) + F.softmax(b(x), dim=1)) / 2)
    torch.testing.assert_close(pair(x), logits)
    torch.testing.assert_close(feats, torch.cat([a(x, return_features=True)[1], b(x, return_features=True)[1]], dim=1))


# ---- DivideMix: the step ----------------------------------------------------------------------


def test_a_dividemix_step_against_the_formulas(digits_task):
    """Co-divide (each network's labelled set and weights come from its peer's posteriors),
    co-refinement with the network's own train-mode predictions, co-guessing with the peer's
    eval-mode ones, MixMatch over both views, and the ramped lambda_u."""
    method = build(digits_task, "dividemix", dm_warmup=0, dm_lambda_u=10.0)
    method.start_epoch(2)  # lambda_u at the epoch's first step: 10 x (2 - 0) / 16
    assert method.lambda_u_now() == 1.25
    method.clean_prob.copy_(torch.rand(method.clean_prob.shape, generator=torch.Generator().manual_seed(3)))
    method.beta.sample = lambda: torch.tensor([0.3, 0.8])  # lambda' = 0.7 and 0.8
    batch = first_batch(digits_task, size=16)
    nets = [copy.deepcopy(m) for m in method.models]
    torch.manual_seed(5)
    out = method.train_step(batch, None)

    torch.manual_seed(5)
    perms = [torch.randperm(32), torch.randperm(32)]  # the step's only random draws (digits: no augmentation)
    x, C = batch.x, 10
    with torch.no_grad():
        own = [F.softmax(net.train()(x), dim=1) for net in nets]
        peer = [F.softmax(net.eval()(x), dim=1) for net in nets]
    for net in nets:
        net.train()
    expected, lx_sum = [], 0.0
    for k, o, lam in ((0, 1, 0.7), (1, 0, 0.8)):
        w = method.clean_prob[o][batch.index]
        labelled = w > 0.5
        assert 0 < labelled.sum() < 16
        rows = []
        for i in range(16):
            if labelled[i]:
                raw = w[i] * F.one_hot(batch.y[i], C).float() + (1 - w[i]) * own[k][i]
            else:
                raw = (own[k][i] + peer[o][i]) / 2
            rows.append(raw**2 / (raw**2).sum())
        t = torch.stack(rows)
        inputs, both, mask = torch.cat([x, x]), torch.cat([t, t]), torch.cat([labelled, labelled])
        mixed_x = lam * inputs + (1 - lam) * inputs[perms[k]]
        mixed_t = lam * both + (1 - lam) * both[perms[k]]
        z = nets[k](mixed_x)
        logp, p = F.log_softmax(z, dim=1), F.softmax(z, dim=1)
        lx = -(mixed_t * logp).sum(1)[mask].mean()
        lu = ((p - mixed_t) ** 2).mean(1)[~mask].mean()
        penalty = ((1 / C) * torch.log((1 / C) / p.mean(0))).sum()
        expected.append(lx + 1.25 * lu + penalty)
        lx_sum += lx.item()
    torch.testing.assert_close(out.loss, ((expected[0] + expected[1]) / 2).detach(), rtol=1e-5, atol=1e-6)
    assert out.stats["dm_lx"].item() == pytest.approx(lx_sum / 2, rel=1e-5)
    torch.testing.assert_close(out.logits, torch.log((own[0] + own[1]) / 2))
    assert out.stats["batch_labelled_frac2"].item() == pytest.approx((method.clean_prob[1][batch.index] > 0.5).float().mean().item())


def test_dividemix_divides_with_each_networks_gmm_on_its_normalised_losses(digits_task):
    method = build(digits_task, "dividemix", dm_warmup=1)
    method.start_epoch(0)
    assert torch.equal(method.clean_prob, torch.ones_like(method.clean_prob))  # warm-up: no division yet
    method.start_epoch(1)
    from nrcore.methods.dividemix import train_losses

    for k, net in enumerate(method.models):
        normalised = min_max(train_losses(net, digits_task, 32, "cpu"))
        low, _ = fit_two_component_gmm(normalised, max_iter=10, tol=1e-2, reg_covar=5e-4)
        torch.testing.assert_close(method.clean_prob[k], low.float())
    assert int(method.history_count) == 1


def test_dividemix_averages_the_loss_window(digits_task):
    method = build(digits_task, "dividemix", dm_warmup=0, dm_loss_window=2)
    losses = [torch.rand(2, len(digits_task.train), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    method.current_losses = lambda: losses.pop(0)
    seen = []
    method.fit_division = lambda values: seen.append(values.clone()) or torch.ones_like(values)
    history = [losses[0].clone(), losses[1].clone(), losses[2].clone()]
    for epoch in range(3):
        method.start_epoch(epoch)
    torch.testing.assert_close(seen[0], history[0][0])  # one epoch so far: its own losses
    torch.testing.assert_close(seen[2], (history[0][0] + history[1][0]) / 2)  # network 1, epochs 0-1
    torch.testing.assert_close(seen[4], (history[1][0] + history[2][0]) / 2)  # the oldest drops out
    torch.testing.assert_close(seen[5], (history[1][1] + history[2][1]) / 2)  # network 2


@pytest.mark.parametrize("augmented", [False, True], ids=["same-view", "two-views"])
def test_dividemix_steps_do_not_sync(digits_task, run_steps, augmented):
    task = dataclasses.replace(digits_task, augmentation=Augmentation(pad=1, crop=8, flip=True)) if augmented else digits_task
    losses, method = run_steps(task, "dividemix", {"dm_warmup": 0}, steps=2, warmup=1, around_step=no_host_sync, host_reads_free=False)
    assert torch.isfinite(losses).all() and method.lambda_u_now() > 0


def test_dividemix_warmup_adds_the_confidence_penalty_where_asked(digits_task):
    plain, penalised = build(digits_task, "dividemix", dm_conf_penalty="off"), build(digits_task, "dividemix", dm_conf_penalty="on")
    batch = first_batch(digits_task)
    with torch.no_grad():
        z1, z2 = plain.model1(batch.x), plain.model2(batch.x)
    out_plain, out_pen = plain.train_step(batch, None), penalised.train_step(batch, None)
    ce = (F.cross_entropy(z1, batch.y) + F.cross_entropy(z2, batch.y)) / 2
    torch.testing.assert_close(out_plain.loss, ce)
    torch.testing.assert_close(out_pen.loss, ce + (confidence_penalty(z1) + confidence_penalty(z2)) / 2)


# ---- Task.batch -------------------------------------------------------------------------------


def test_task_batch_augments_like_the_loader(digits_task):
    task = dataclasses.replace(digits_task, augmentation=Augmentation(pad=2, crop=8, flip=True))
    from_loader = next(iter(task.loader("train", 8, augment=True, generator=torch.Generator().manual_seed(7))))
    made = task.batch("train", torch.arange(8), generator=torch.Generator().manual_seed(7))
    for field in ("x", "y", "index", "y_true"):
        assert torch.equal(getattr(made, field), getattr(from_loader, field)), field
    plain = next(iter(task.loader("train", 8)))
    assert not torch.equal(made.x, plain.x)
    assert torch.equal(task.batch("train", torch.arange(8), augment=False).x, plain.x)
    # a slice of a global batch draws what the whole batch would and keeps its rows
    part = task.batch("train", torch.arange(2, 5), generator=torch.Generator().manual_seed(7), offset=2, whole_size=8)
    assert torch.equal(part.x, made.x[2:5]) and (part.offset, part.whole_size) == (2, 8)
    # without an augmentation: the unaugmented images
    assert torch.equal(digits_task.batch("train", torch.tensor([5, 0, 3])).x, plain.x[[5, 0, 3]])
    streamed = dataclasses.replace(digits_task, train=Split(labels=digits_task.train.labels, true_labels=digits_task.train.true_labels,
                                                             source_index=digits_task.train.source_index, source=object()))  # fmt: skip
    with pytest.raises(ValueError, match="in memory"):
        streamed.batch("train", torch.arange(3))


# ---- DivideMix: end to end ---------------------------------------------------------------------


def test_dividemix_learns_on_digits_labels_cleaner_than_the_noise_and_resumes_exactly(run_tiny, tiny_config, tmp_path):
    """One warm-up epoch, two dividing epochs with a two-epoch loss window; then the same run
    stopped after its first dividing epoch and resumed (the window comes from the checkpoint)."""
    from nrcore.data import build_task
    from nrcore.train import train

    settings = dict(epochs=3, dm_warmup=1, dm_loss_window=2)
    summary, run_dir = run_tiny("dividemix", noise="sym50", **settings)
    assert summary["test_acc_last"] > 70  # chance 10%
    rec = records(run_dir)
    assert [r["dm_warmup_epoch"] for r in rec] == [1, 0, 0]
    # lambda_u (sym50, 10 classes: 25) at each epoch's end: 25 x (epoch + 1 - warm-up) / 16
    assert [r["lambda_u"] for r in rec] == [0.0, 25 / 16, 50 / 16]
    for r in rec[1:]:
        for k in (1, 2):
            assert 0.2 < r[f"labelled_frac{k}"] < 0.8 and r[f"label_precision{k}"] > 0.8
    audit = np.load(run_dir / "audit.npz")
    assert json.loads(str(audit["meta"]))["default"] == "dividemix_noisy_posterior"
    task = build_task("digits", noise="sym50", clean_size=100, val_size=100, seed=0)
    score = audit["dividemix_noisy_posterior__score"]
    np.testing.assert_allclose(score, (audit["dividemix_noisy_posterior1__score"] + audit["dividemix_noisy_posterior2__score"]) / 2, atol=1e-6)
    assert auroc(score, task.train.is_noisy.numpy()) > 0.85

    cfg = tiny_config("dividemix", noise="sym50", **settings)
    train(cfg, tmp_path / "split", stop_after_epoch=2)
    split = train(cfg, tmp_path / "split", resume=True)
    assert split["test_acc_last"] == summary["test_acc_last"]
    for a, b in zip(rec, records(tmp_path / "split")):
        for key in ("train_loss", "test_acc", "val_acc", "labelled_frac1", "label_precision2", "dm_lx"):
            assert a.get(key) == b.get(key), (key, a["epoch"])


# ---- options and presets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--method", "fine", "--fine-threshold", "1"], "--fine-threshold must be < 1"),
        (["--method", "fine", "--fine-threshold", "-0.1"], "--fine-threshold must be >= 0"),
        (["--method", "fine", "--fine-every", "0"], "--fine-every must be >= 1"),
        (["--method", "fine", "--fine-warmup", "-1"], "--fine-warmup must be >= 0"),
        (["--method", "dividemix", "--dm-p-threshold", "1.5"], "--dm-p-threshold must be < 1"),
        (["--method", "dividemix", "--dm-temperature", "0"], "--dm-temperature must be > 0"),
        (["--method", "dividemix", "--dm-alpha", "-1"], "--dm-alpha must be > 0"),
        (["--method", "dividemix", "--dm-lambda-u", "-2"], "--dm-lambda-u must be >= 0"),
        (["--method", "dividemix", "--dm-loss-window", "0"], "--dm-loss-window must be >= 1"),
        (["--method", "dividemix", "--dm-warmup", "-3"], "--dm-warmup must be >= 0"),
    ],
)
def test_bad_options_give_one_line_naming_the_flag(argv, fragment, capsys, tmp_path):
    from nrcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--out", str(tmp_path / "run"), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code != 0 and len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert not (tmp_path / "run").exists()


def test_paper_presets():
    from nrcore.train import resolve_config

    dm = resolve_config(cli={}, cli_method_options={}, preset="dividemix-cifar10")
    assert (dm.method, dm.dataset, dm.model, dm.epochs, dm.batch_size, dm.lr, dm.milestones) == ("dividemix", "cifar10", "preact-resnet18", 300, 128, 0.02, [150])
    assert dm.clean_size is None and dm.clean_frac is None and dm.method_options["dm_warmup"] == 10
    assert resolve_config(cli={}, cli_method_options={}, preset="dividemix-cifar100").method_options["dm_warmup"] == 30
    fine = resolve_config(cli={}, cli_method_options={}, preset="fine-cifar10")
    assert (fine.model, fine.epochs, fine.lr, fine.weight_decay, fine.milestones, fine.gamma) == ("resnet34", 120, 0.02, 1e-3, [40, 80], 0.01)
    assert fine.method_options == {"fine_warmup": 40, "fine_every": 10, "fine_threshold": 0.5, "fine_score": "abs"}
