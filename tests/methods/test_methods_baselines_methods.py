"""The baseline methods behind the Method contract, on a hand-built task (no data layer):
phases, estimators wired to the right split and model, which network learns from which
selection, GLC's weighting of the trusted batch, and resuming in phase 2."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrcore.data.types import Batch, Split
from nrcore.methods import MethodContext, OptimConfig
from nrcore.methods.families.transition import anchor_point_transition, forward_corrected_nll
from nrcore.models.inference import predict_examples, predict_split
from nrcore.methods.bootstrap import Bootstrap
from nrcore.methods.coteaching import CoTeaching
from nrcore.methods.coteaching_plus import CoTeachingPlus
from nrcore.methods.forward import Forward
from nrcore.methods.glc import GoldLossCorrection

C = 4
# no zeros, diagonally dominant: softmax(log T[c]) = T[c], and each column peaks on its diagonal
T = torch.full((C, C), 0.1, dtype=torch.float64) + 0.6 * torch.eye(C, dtype=torch.float64)


class HandTask:
    """The part of nrcore.data.types.Task the methods read, over in-memory tensors."""

    def __init__(self, x_train, y_train, x_clean, y_clean, transition=T, nominal=0.3, dataset="hand"):
        self.dataset, self.num_classes = dataset, C
        self.transition_matrix, self.noise_rate_nominal = transition, nominal
        self.x = {"train": x_train, "clean": x_clean}
        self.train = Split(labels=y_train, true_labels=y_train, source_index=torch.arange(len(y_train)))
        self.clean = Split(labels=y_clean, true_labels=y_clean, source_index=torch.arange(len(y_clean)))

    def loader(self, split, batch_size, *, shuffle=False, augment=False, drop_last=False, generator=None, device="cpu", num_workers=None):
        x, y = self.x[split], getattr(self, split).labels
        return [Batch(x[i : i + batch_size], y[i : i + batch_size], torch.arange(i, min(i + batch_size, len(y)))) for i in range(0, len(y), batch_size)]


def one_hots(classes):
    return F.one_hot(torch.tensor(classes), C).float()


def hand_task(**kwargs):
    torch.manual_seed(1)
    y_train = torch.randint(0, C, (18,))
    y_clean = torch.tensor([0, 1, 2, 3, 0, 1])
    return HandTask(one_hots(y_train.tolist()) + 0.1 * torch.randn(18, C), y_train, one_hots(y_clean.tolist()), y_clean, **kwargs)


def context(task, factory=None, epochs=3, lr=1.0, momentum=0.0):
    torch.manual_seed(0)
    factory = factory or (lambda: nn.Linear(C, C))
    return MethodContext(task, "cpu", factory, OptimConfig(lr=lr, momentum=momentum, weight_decay=0.0), epochs=epochs, batch_size=4, seed=0)


def noise_model():
    """A 'trained on noisy labels' model: on the one-hot of class c it predicts T[c, :]."""
    model = nn.Linear(C, C, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.log(T).t().float())
    return model


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ---- transition-corrected methods -----------------------------------------------------------
def test_glc_estimates_the_matrix_from_the_trusted_set_predictions():
    ctx = context(hand_task(), factory=noise_model)
    glc = GoldLossCorrection(ctx)
    glc.start_epoch(ctx.epochs)
    torch.testing.assert_close(glc.transition.double(), T, rtol=0, atol=1e-6)


def test_forward_anchor_estimate_reads_the_noisy_training_inputs():
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    task = HandTask(one_hots(y.tolist()), y, one_hots([0]), torch.tensor([0]), transition=None)
    ctx = context(task, factory=noise_model)
    method = Forward(ctx, transition="estimate", anchor_percentile=100.0, phase1_holdout=0.0)
    method.start_epoch(ctx.epochs)
    torch.testing.assert_close(method.transition.double(), T, rtol=0, atol=1e-6)
    assert method.end_epoch(ctx.epochs) == {"phase": 2}  # no true matrix: no error logged
    with pytest.raises(ValueError, match="transition estimate"):
        Forward(ctx, transition="true")


def test_phased_method_runs_two_schedules_and_restarts_the_network_at_phase_two():
    ctx = context(hand_task(), epochs=3, momentum=0.9)
    method = Forward(ctx, transition="estimate", phase1_holdout=0.0)  # the hold-out: next test
    assert method.num_epochs(3) == 6
    assert [method.schedule_epoch(e) for e in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [method.phase(e) for e in range(6)] == [1, 1, 1, 2, 2, 2]

    task = ctx.task
    batch = task.loader("train", 4)[0]
    method.start_epoch(0)
    with torch.no_grad():
        phase1_loss = F.cross_entropy(method.model(batch.x), batch.y)
    assert method.train_step(batch, None).loss.item() == pytest.approx(phase1_loss.item())  # plain CE
    assert method.opt.state  # momentum buffers exist
    phase1 = params(method.model)
    expected = anchor_point_transition(predict_split(method.model, task, "train", 4, "cpu")[0], 97.0)
    method.start_epoch(3)
    torch.testing.assert_close(method.transition.double(), expected.double(), rtol=0, atol=1e-6)
    assert not method.opt.state, "phase 2 must not inherit phase 1's momentum"
    assert all(not torch.equal(a, b) for a, b in zip(phase1, params(method.model)))
    assert method.correcting and method.end_epoch(3)["phase"] == 2 and "transition_l1_error" in method.end_epoch(3)

    # resume in phase 2: the estimate and the phase come back from the checkpoint
    state = method.state_dict()
    resumed = Forward(context(ctx.task, epochs=3, momentum=0.9), transition="estimate", phase1_holdout=0.0)
    resumed.load_state_dict(state)
    resumed.start_epoch(4)
    assert resumed.correcting
    torch.testing.assert_close(resumed.transition, method.transition)
    for a, b in zip(params(resumed.model), params(method.model)):
        assert torch.equal(a, b)


def test_forward_phase1_holdout_is_left_out_of_training_and_picks_the_epoch_to_estimate_from():
    y = torch.arange(24) % C  # six of each class; the hold-out (a quarter) cannot take a whole class
    task = HandTask(one_hots(y.tolist()), y, one_hots([0]), torch.tensor([0]))
    ctx = context(task, factory=noise_model)
    method = Forward(ctx, transition="estimate", anchor_percentile=100.0, phase1_holdout=0.25)
    held = method.held_out
    assert held.sum() == 6 and torch.equal(held, Forward(context(task), phase1_holdout=0.25).held_out)  # a function of the seed
    assert all(bool((~held & (y == c)).any()) for c in range(C))

    # phase 1: the loss averages the cross-entropy of the batch's examples outside the hold-out
    batch = Batch(task.x["train"][:8], y[:8], torch.arange(8))
    assert 0 < int(held[:8].sum()) < 8
    with torch.no_grad():
        per_example = F.cross_entropy(method.model(batch.x), batch.y, reduction="none")
    method.start_epoch(0)
    assert method.train_step(batch, None).loss.item() == pytest.approx(per_example[~held[:8]].mean().item())

    # after each phase-1 epoch: the hold-out's loss on its noisy labels; the lowest one is kept
    def set_weights(w):
        with torch.no_grad():
            method.model.weight.copy_(w)

    set_weights(torch.zeros(C, C))  # uniform predictions
    assert method.end_epoch(0) == {"phase": 1, "holdout_nll": pytest.approx(math.log(C))}
    set_weights(torch.log(T).t().float())  # the noise model: p(label | one-hot of the label) = 0.7
    assert method.end_epoch(1)["holdout_nll"] == pytest.approx(-math.log(0.7), rel=1e-6)
    set_weights(-torch.log(T).t().float())  # worse than uniform
    assert method.end_epoch(2)["holdout_nll"] > math.log(C)
    assert method.phase1_best["epoch"] == 2  # 1-based, as in metrics.jsonl

    # resuming in phase 1 brings the best epoch and its weights back
    resumed = Forward(context(task, factory=noise_model), anchor_percentile=100.0, phase1_holdout=0.25)
    resumed.load_state_dict(method.state_dict())
    assert resumed.phase1_best["epoch"] == 2
    torch.testing.assert_close(resumed.phase1_best["model"]["weight"], torch.log(T).t().float())

    # the estimate is read from epoch 2's weights (not the last epoch's), on the examples phase 1 trained on
    method.start_epoch(ctx.epochs)
    torch.testing.assert_close(method.transition.double(), T, rtol=0, atol=1e-6)
    assert method.phase1_best["model"] is None  # not carried into phase 2's checkpoints
    assert method.artifact_info() == {"phase1_holdout_examples": 6, "phase1_epoch": 2}
    assert "holdout_nll" not in method.end_epoch(ctx.epochs)


def test_predict_examples_reads_the_rows_asked_for():
    from nrcore.data import build_task

    task = build_task("digits", noise="sym50", clean_size=100, val_size=0, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    rows = torch.tensor([5, 0, 700, 3, 1000])
    probs, labels = predict_examples(model, task, "train", rows, 2, "cpu")
    all_probs, all_labels = predict_split(model, task, "train", 256, "cpu")
    torch.testing.assert_close(probs, all_probs[rows])
    assert torch.equal(labels, all_labels[rows]) and torch.equal(labels, task.train.labels[rows])


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_forward_rejects_a_holdout_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="--phase1-holdout"):
        Forward(context(hand_task()), phase1_holdout=fraction)
    with pytest.raises(ValueError, match="--phase1-holdout"):
        Forward(context(hand_task()), phase1_holdout=0.01)  # rounds to no example of 18


def test_forward_true_corrects_from_the_first_step_with_the_true_matrix():
    ctx = context(hand_task())
    method = Forward(ctx, transition="true")
    assert method.num_epochs(3) == 3 and method.schedule_epoch(2) == 2
    method.start_epoch(0)
    batch = ctx.task.loader("train", 4)[0]
    expected = forward_corrected_nll(method.model(batch.x), batch.y, T).mean()
    assert method.train_step(batch, None).loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_glc_weights_the_trusted_examples_by_their_share_of_the_union():
    task = hand_task()  # 18 noisy, 6 trusted: share 6 / 24; batch 4 -> ceil(4 * 6 / 18) = 2 trusted per step
    ctx = context(task, factory=noise_model)
    glc = GoldLossCorrection(ctx)
    assert glc.trusted_share == pytest.approx(0.25) and glc.trusted_per_step == 2
    glc.start_epoch(ctx.epochs)  # estimates T; the fresh network is noise_model() again
    batch, clean = task.loader("train", 4)[0], task.loader("clean", 6)[0]
    with torch.no_grad():
        untrusted = forward_corrected_nll(glc.model(batch.x), batch.y, glc.transition).mean()
        trusted = F.cross_entropy(glc.model(clean.x[:2]), clean.y[:2])
    loss = glc.train_step(batch, clean).loss
    assert loss.item() == pytest.approx(0.75 * untrusted.item() + 0.25 * trusted.item(), rel=1e-6)


# ---- two-network methods --------------------------------------------------------------------
def test_coteaching_updates_each_network_with_its_peers_small_loss_picks():
    task = hand_task()
    ctx = context(task)
    method = CoTeaching(ctx, forget_rate=0.5, num_gradual=0)
    assert method.eval_model() is method.model1
    method.start_epoch(0)
    assert method.epoch_forget_rate == 0.5  # no ramp
    batch = task.loader("train", 18)[0]  # the whole set: 9 picks each
    before1, before2 = params(method.model1), params(method.model2)
    with torch.no_grad():
        ce1 = F.cross_entropy(method.model1(batch.x), batch.y, reduction="none").numpy()
        ce2 = F.cross_entropy(method.model2(batch.x), batch.y, reduction="none").numpy()
    picks1, picks2 = np.argsort(ce1)[:9], np.argsort(ce2)[:9]
    assert set(picks1) != set(picks2), "pick a batch where the networks disagree, or the test proves nothing"
    method.train_step(batch, None)

    def expected_after(before, picks):
        model = nn.Linear(C, C)
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
        F.cross_entropy(model(batch.x[picks]), batch.y[picks]).backward()  # one mean over the picks
        return [b - p.grad for p, b in zip(model.parameters(), before)]  # SGD, lr 1

    for got, want in zip(params(method.model1), expected_after(before1, torch.tensor(picks2))):
        torch.testing.assert_close(got, want)
    for got, want in zip(params(method.model2), expected_after(before2, torch.tensor(picks1))):
        torch.testing.assert_close(got, want)


def test_coteaching_forget_rate_defaults_to_the_nominal_noise_rate():
    assert CoTeaching(context(hand_task(nominal=0.3))).forget_rate == 0.3
    real_labels = CoTeaching(context(hand_task(nominal=None)))  # off-diagonal mass of T: 0.3
    assert real_labels.forget_rate == pytest.approx(0.3)
    method = CoTeaching(context(hand_task(nominal=0.3)), num_gradual=10)
    method.start_epoch(5)
    assert method.end_epoch(5) == {"forget_rate": pytest.approx(0.15)}
    with pytest.raises(ValueError):
        CoTeaching(context(hand_task()), forget_rate=1.0)


def test_coteaching_plus_selects_inside_the_disagreement_set_after_init_epoch():
    method = CoTeachingPlus(context(hand_task()), forget_rate=0.5, num_gradual=0, init_epoch=2)
    labels = torch.zeros(4, dtype=torch.long)
    # predictions: network 1 -> [0, 0, 1, 1], network 2 -> [0, 1, 0, 1]: they disagree on 1 and 2
    p1 = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.1, 0.9]])
    p2 = torch.tensor([[0.95, 0.05], [0.3, 0.7], [0.8, 0.2], [0.2, 0.8]])
    logits1, logits2 = p1.log(), p2.log()
    batch = Batch(torch.zeros(4, C), labels, torch.arange(4), y_true=torch.tensor([0, 0, 1, 0]))

    method.start_epoch(1)  # before init_epoch: Co-teaching on the whole batch, 2 of 4
    loss1, loss2, stats = method.losses(logits1, logits2, batch)
    assert loss1.item() == pytest.approx(-(math.log(0.9) + math.log(0.45)) / 2)  # network 2 picks 0 and 2
    assert "disagree_frac" not in stats

    method.start_epoch(2)  # candidates {1, 2}; each network keeps ceil(0.5 * 2) = 1
    loss1, loss2, stats = method.losses(logits1, logits2, batch)
    assert loss1.item() == pytest.approx(-math.log(0.45))  # network 2's pick: example 2 (CE -log 0.8)
    assert loss2.item() == pytest.approx(-math.log(0.3))  # network 1's pick: example 1 (CE -log 0.6)
    assert stats["disagree_frac"].item() == 0.5 and stats["selected_frac"].item() == 0.25
    assert stats["label_precision"].item() == 1.0  # example 1 carries its true label
    assert method.end_epoch(2)["disagreement_rule"] == 1


def test_coteaching_plus_warns_once_when_the_networks_agree_on_every_example():
    task = hand_task()
    method = CoTeachingPlus(context(task), forget_rate=0.5, num_gradual=0, init_epoch=0, full_batch_steps=0)
    batches = task.loader("train", 4)
    method.start_epoch(0)
    for batch in batches:
        method.train_step(batch, None)
    assert method.end_epoch(0)["disagreements"] > 0  # two random initialisations disagree somewhere

    method.model2.load_state_dict(method.model1.state_dict())  # identical networks: no disagreement
    method.opt2.load_state_dict(method.opt1.state_dict())
    for epoch in (1, 2):
        method.start_epoch(epoch)
        for batch in batches:
            assert method.train_step(batch, None).loss.item() == 0  # nothing selected
        if epoch == 1:
            with pytest.warns(RuntimeWarning, match="agreed on every training example in epoch 2"):
                assert method.end_epoch(epoch)["disagreements"] == 0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once per run, not every epoch
                assert method.end_epoch(epoch)["disagreements"] == 0


def test_coteaching_plus_full_batch_steps_train_on_an_agreed_batch_only_while_they_last():
    task = hand_task()
    method = CoTeachingPlus(context(task), forget_rate=0.5, num_gradual=0, init_epoch=0, full_batch_steps=2)
    batch = Batch(torch.zeros(4, C), torch.tensor([0, 1, 0, 0]), torch.arange(4), y_true=torch.tensor([0, 0, 0, 0]))
    agree = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 4)  # both networks predict class 0 everywhere
    disagree = agree.clone()
    disagree[1] = torch.tensor([0.0, 2.0, 0.0, 0.0])  # network 2 predicts 1 on example 1
    method.start_epoch(0)
    # step 1: they disagree on example 1, the disagreement rule applies (no fallback)
    loss1, _, stats = method.losses(agree, disagree, batch)
    assert loss1.item() == pytest.approx(F.cross_entropy(agree[1:2], batch.y[1:2]).item()) and stats["full_batch_frac"] == 0
    # step 2: they agree everywhere; within the first 2 steps both train on the whole batch
    loss1, loss2, stats = method.losses(agree, agree, batch)
    assert loss1.item() == pytest.approx(F.cross_entropy(agree, batch.y).item()) and loss2.item() == loss1.item()
    assert stats["full_batch_frac"] == 1 and stats["selected_frac"] == 1 and stats["label_precision"] == 0.75
    # step 3: past the fallback's steps: nothing to select, no loss (the paper's rule)
    loss1, loss2, stats = method.losses(agree, agree, batch)
    assert loss1.item() == loss2.item() == 0 and stats["full_batch_frac"] == 0
    assert CoTeachingPlus(context(task)).full_batch_steps == 5000  # the authors' value
    with pytest.raises(ValueError, match="--full-batch-steps"):
        CoTeachingPlus(context(task), full_batch_steps=-1)


def test_coteaching_plus_init_epoch_defaults_follow_the_authors_per_dataset_values():
    assert CoTeachingPlus(context(hand_task(dataset="cifar10"))).init_epoch == 20
    assert CoTeachingPlus(context(hand_task(dataset="cifar100"))).init_epoch == 5
    assert CoTeachingPlus(context(hand_task(dataset="mnist10k"))).init_epoch == 0
    assert CoTeachingPlus(context(hand_task(dataset="cifar10")), init_epoch=3).init_epoch == 3


def test_bootstrap_beta_defaults_to_the_papers_value_for_the_mode():
    ctx = context(hand_task())
    assert Bootstrap(ctx).beta == 0.95 and Bootstrap(ctx, bootstrap_mode="hard").beta == 0.8
    assert Bootstrap(ctx, bootstrap_mode="hard", bootstrap_beta=0.6).beta == 0.6
    with pytest.raises(ValueError):
        Bootstrap(ctx, bootstrap_beta=1.5)


def test_coteaching_plus_checkpoints_its_step_count(digits_task, run_steps):
    """`steps_done` is a plain int that `+=` rebinds: the checkpoint must hold the count, not the
    0 it was tracked with (a resumed run would otherwise restart the full-batch fallback)."""
    _, method = run_steps(digits_task, "coteaching-plus", {"init_epoch": 0}, steps=3)
    assert method.steps_done == 3 and method.state_dict()["steps_done"] == 3
    _, fresh = run_steps(digits_task, "coteaching-plus", {"init_epoch": 0}, steps=1)
    fresh.load_state_dict(method.state_dict())
    assert fresh.steps_done == 3
