"""JoCoR and CORES² (phase 1): their losses and selection rules on hand-made tensors, one step of
each method on a hand-built task checked against a by-hand update, their schedules and
defaults, bad options through the CLI, and tiny digits runs (learning, audit signals, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrcore.data.types import Batch, Split
from nrcore.methods import MethodContext, OptimConfig
from nrcore.methods.coteaching import SELECTION_OPTIONS
from nrcore.methods.cores import Cores, cores_beta_at, cores_losses, noisy_prior, scaled_epochs
from nrcore.methods.families.selection import forget_rate_at
from nrcore.methods.jocor import JoCoR, jocor_joint_loss, reference_lambda, symmetric_kl

C = 3


def _logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


class HandTask:
    """The part of nrcore.data.types.Task the two methods read."""

    def __init__(self, labels, true_labels=None, dataset="hand", nominal=0.4, num_classes=C):
        self.dataset, self.num_classes, self.noise_rate_nominal = dataset, num_classes, nominal
        self.transition_matrix = None
        labels = torch.as_tensor(labels)
        true_labels = labels if true_labels is None else torch.as_tensor(true_labels)
        self.train = Split(labels=labels, true_labels=true_labels, source_index=torch.arange(len(labels)))


def context(task, epochs=4, lr=1.0):
    torch.manual_seed(0)
    return MethodContext(task, "cpu", lambda: nn.Linear(C, C), OptimConfig(lr=lr, momentum=0.0, weight_decay=0.0), epochs=epochs,
                         batch_size=4, seed=0)  # fmt: skip


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def linear_with(before):
    model = nn.Linear(C, C)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return model


# ---- JoCoR: the joint loss ---------------------------------------------------------------------
def test_symmetric_kl_by_hand_and_as_the_authors_compute_it():
    p1, p2 = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], [[0.2, 0.5, 0.3], [0.5, 0.25, 0.25]]
    by_hand = [sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(r1, r2)) for r1, r2 in zip(p1, p2)]
    z1 = _logits_of(p1).float().requires_grad_(True)
    z2 = _logits_of(p2).float().requires_grad_(True)
    got = symmetric_kl(z1, z2)
    assert got.tolist() == pytest.approx(by_hand, rel=1e-5) and by_hand[0] > 0.5 and by_hand[1] == 0
    got.sum().backward()
    # hongxin001/JoCoR `kl_loss_compute(pred, soft_targets, reduce=False)`: summed over classes
    # per example, the target side not detached; the joint loss adds both directions
    r1, r2 = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)

    def kl_loss_compute(pred, soft_targets):
        return F.kl_div(F.log_softmax(pred, dim=1), F.softmax(soft_targets, dim=1), reduction="none").sum(1)

    reference = kl_loss_compute(r1, r2) + kl_loss_compute(r2, r1)
    torch.testing.assert_close(got.detach(), reference.detach())
    reference.sum().backward()
    torch.testing.assert_close(z1.grad, r1.grad)
    torch.testing.assert_close(z2.grad, r2.grad)
    assert z2.grad.abs().sum() > 0.1  # both networks are pulled towards each other


def test_joint_loss_weighs_both_cross_entropies_against_the_agreement():
    p1, p2 = [[0.7, 0.2, 0.1]], [[0.2, 0.5, 0.3]]
    ce = -math.log(0.2) - math.log(0.5)  # label 1
    kl = sum(a * math.log(a / b) + b * math.log(b / a) for a, b in zip(p1[0], p2[0]))
    joint, kl_term = jocor_joint_loss(_logits_of(p1), _logits_of(p2), torch.tensor([1]), 0.9)
    assert joint.item() == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-6)
    assert kl_term.item() == pytest.approx(kl, rel=1e-6)
    joint0, _ = jocor_joint_loss(_logits_of(p1), _logits_of(p2), torch.tensor([1]), 0.0)
    assert joint0.item() == pytest.approx(ce, rel=1e-6)


def test_jocor_trains_both_networks_on_the_mean_joint_loss_of_its_small_loss_examples():
    labels = [0, 1, 2, 0, 1, 2]
    method = JoCoR(context(HandTask(labels, true_labels=[0, 1, 2, 1, 1, 0])), forget_rate=0.5, num_gradual=0, jocor_lambda=0.7)
    method.start_epoch(0)
    assert method.epoch_forget_rate == 0.5
    torch.manual_seed(3)
    batch = Batch(torch.randn(6, C), torch.tensor(labels), torch.arange(6), y_true=torch.tensor([0, 1, 2, 1, 1, 0]))
    before1, before2 = params(method.model1), params(method.model2)
    model1, model2 = linear_with(before1), linear_with(before2)
    with torch.no_grad():
        joint = jocor_joint_loss(model1(batch.x), model2(batch.x), batch.y, 0.7)[0].numpy()
    picks = np.sort(np.argsort(joint)[:3])
    ce_picks = np.sort(np.argsort(F.cross_entropy(model1(batch.x), batch.y, reduction="none").detach().numpy())[:3])
    assert not np.array_equal(picks, ce_picks), "pick a batch where the joint loss and CE rank differently, or the test proves less"
    out = method.train_step(batch, None)
    # by hand: one loss, the mean joint loss over the 3 picks, and plain SGD (lr 1) on both networks
    z1, z2 = model1(batch.x[picks]), model2(batch.x[picks])
    loss = (0.3 * (F.cross_entropy(z1, batch.y[picks], reduction="none") + F.cross_entropy(z2, batch.y[picks], reduction="none"))
            + 0.7 * symmetric_kl(z1, z2)).mean()  # fmt: skip
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for model, after, before in ((model1, method.model1, before1), (model2, method.model2, before2)):
        for got, b, p in zip(params(after), before, model.parameters()):
            torch.testing.assert_close(got, b - p.grad)
    kept = np.zeros(6, dtype=bool)
    kept[picks] = True
    assert method.kept_count.tolist() == kept.astype(int).tolist() and method.seen_count.tolist() == [1] * 6
    correct = np.array(labels) == np.array([0, 1, 2, 1, 1, 0])
    assert out.stats["selected_frac"].item() == 0.5
    assert out.stats["label_precision"].item() == pytest.approx(correct[picks].mean())
    assert out.stats["symmetric_kl"].item() == pytest.approx(float(np.mean(
        symmetric_kl(linear_with(before1)(batch.x), linear_with(before2)(batch.x)).detach().numpy())), rel=1e-6)  # fmt: skip
    assert set(method.example_state()) == {"kept_count", "seen_count"}
    drop = method.audit_signals()["drop_rate"].score
    assert drop.tolist() == (~kept).astype(float).tolist()


def test_jocor_shares_coteachings_schedule_options_and_default_forget_rate():
    assert JoCoR.options[: len(SELECTION_OPTIONS)] == SELECTION_OPTIONS
    method = JoCoR(context(HandTask([0, 1, 2])), num_gradual=10, forget_exponent=2.0)
    assert method.forget_rate == 0.4  # the nominal noise rate, as Co-teaching
    for epoch in (0, 2, 3, 12):
        method.start_epoch(epoch)
        assert method.epoch_forget_rate == forget_rate_at(epoch, 0.4, 10, 2.0)
    assert method.end_epoch(12) == {"forget_rate": pytest.approx(0.4), "jocor_lambda": 0.9}  # no reference value for "hand": 0.9


def test_jocor_lambda_defaults_to_the_authors_values_per_dataset():
    def lam(dataset, nominal):
        return reference_lambda(HandTask([0], dataset=dataset, nominal=nominal))

    assert lam("cifar10", 0.5) == 0.9 and lam("cifar10n", None) == 0.9 and lam("cifar10", 0.8) == 0.65
    assert lam("cifar100", 0.8) == 0.85 and lam("cifar100n", None) == 0.85
    assert lam("mnist", 0.2) == 0.95 and lam("digits", 0.5) == 0.95
    assert lam("clothing1m", None) == 0.9 and lam("hand", 0.4) == 0.9
    assert JoCoR(context(HandTask([0], dataset="cifar10", nominal=0.8))).co_lambda == 0.65
    assert JoCoR(context(HandTask([0], dataset="cifar10", nominal=0.8)), jocor_lambda=0.2).co_lambda == 0.2


# ---- CORES²: the confidence-regularised loss and the sieve ------------------------------------
def test_cores_loss_and_sieve_score_by_hand_and_as_the_authors_compute_them():
    probs = [[0.8, 0.15, 0.05], [0.8, 0.15, 0.05], [0.1, 0.3, 0.6]]
    labels = torch.tensor([0, 2, 2])
    prior = torch.tensor([0.5, 0.3, 0.2])
    beta = 1.5
    regularised, score = cores_losses(_logits_of(probs).float(), labels, prior, beta)
    for i, (p, y) in enumerate(zip(probs, labels.tolist())):
        every = [-math.log(q + 1e-8) for q in p]
        assert regularised[i].item() == pytest.approx(-math.log(p[y]) - beta * sum(w * e for w, e in zip(prior.tolist(), every)), rel=1e-5)
        assert score[i].item() == pytest.approx(-math.log(p[y]) - sum(every) / 3, rel=1e-5)
    # the confident right label scores below 0 (kept), the improbable label above (dropped)
    assert score[0] < 0 < score[1] and score[2] < 0
    # haochenglouis/cores loss.py `loss_cores`: loss_sel = CE - mean(-log(softmax + 1e-8));
    # loss = CE - beta * sum(noise_prior * -log(softmax + 1e-8))
    z = _logits_of(probs).float()
    every = -torch.log(F.softmax(z, dim=1) + 1e-8)
    ce = F.cross_entropy(z, labels, reduction="none")
    torch.testing.assert_close(score, ce - every.mean(1))
    torch.testing.assert_close(regularised, ce - beta * (prior * every).sum(1))


def test_the_regulariser_is_bounded_by_the_log_epsilon():
    # a class the model rules out costs at most -log(1e-8) = 18.42: without the epsilon the
    # regularised loss would be unbounded below
    logits = torch.tensor([[60.0, 0.0, -60.0]])
    regularised, _ = cores_losses(logits, torch.tensor([0]), torch.tensor([0.0, 0.0, 1.0]), 1.0)
    assert regularised.item() == pytest.approx(-(-math.log(1e-8)), rel=1e-4)


def test_beta_schedule_is_the_authors_f_beta_at_100_epochs_and_scales_with_the_run():
    authors = np.concatenate((np.linspace(0.0, 0.0, num=10), np.linspace(0.0, 2, num=30), np.linspace(2, 2, num=60)))
    ours = [cores_beta_at(e, 2.0, scaled_epochs(10, 100), scaled_epochs(30, 100)) for e in range(100)]
    np.testing.assert_allclose(ours, authors, rtol=0, atol=1e-12)
    assert [scaled_epochs(r, 100) for r in (10, 30, 31)] == [10, 30, 31]
    assert [scaled_epochs(r, 30) for r in (10, 30, 31)] == [3, 9, 9]
    assert [scaled_epochs(r, 3) for r in (10, 30, 31)] == [0, 1, 1]
    assert [cores_beta_at(e, 2.0, 1, 3) for e in range(5)] == [0.0, 0.0, 1.0, 2.0, 2.0]
    assert [cores_beta_at(e, 2.0, 0, 0) for e in range(2)] == [2.0, 2.0]
    method = Cores(context(HandTask([0, 1, 2]), epochs=30))
    assert (method.beta_warmup, method.beta_ramp, method.sieve_warmup) == (3, 9, 9)


def test_noisy_prior_counts_the_labels_of_the_kept_examples():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    torch.testing.assert_close(noisy_prior(labels, 4), torch.tensor([2, 1, 3, 0], dtype=torch.float64) / 6)
    kept = torch.tensor([True, False, True, False, True, True])
    torch.testing.assert_close(noisy_prior(labels, 4, kept), torch.tensor([1, 1, 2, 0], dtype=torch.float64) / 4)
    assert noisy_prior(labels, 4, torch.zeros(6, dtype=torch.bool)) is None


def _cores_step_setup(**options):
    labels = [0, 1, 2, 0, 1, 2]
    true = [0, 1, 2, 1, 1, 0]
    method = Cores(context(HandTask(labels, true_labels=true), epochs=10), cores_beta=2.0, cores_beta_warmup=0, cores_beta_ramp=0,
                   cores_sieve_warmup=2, **options)  # fmt: skip
    with torch.no_grad():  # the model predicts class c on the one-hot of c: a confident, easy-to-follow model
        method.model.weight.copy_(3 * torch.eye(C))
        method.model.bias.zero_()
    x = F.one_hot(torch.tensor([0, 1, 2, 0, 0, 0]), C).float()  # examples 4 and 5 look like another class than their label
    batch = Batch(x, torch.tensor(labels), torch.arange(6), y_true=torch.tensor(true))
    return method, batch


def test_cores_step_sieves_by_hand_and_steps_on_the_kept_examples_only():
    method, batch = _cores_step_setup()
    assert method.prior.tolist() == pytest.approx([1 / 3] * 3)
    method.start_epoch(2)
    assert method.sieve_on and method.beta == 2.0
    assert method.opt.param_groups[0]["lr"] == pytest.approx(1 / 3)  # lr / (1 + beta)
    before = params(method.model)
    model = linear_with(before)
    regularised, score = cores_losses(model(batch.x), batch.y, method.prior, 2.0)
    kept = (score <= 0).detach()
    # a label the model follows: CE 0.095 against a mean of 2.09 over the labels; one it rules out: 3.09
    assert kept.tolist() == [True, True, True, True, False, False]
    out = method.train_step(batch, None)
    loss = regularised[kept].mean()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    for got, b, p in zip(params(method.model), before, model.parameters()):
        torch.testing.assert_close(got, b - p.grad / 3)  # SGD at lr 1 / (1 + beta)
    assert out.stats["selected_frac"].item() == pytest.approx(4 / 6)
    correct = (batch.y == batch.y_true)[kept].float().mean().item()
    assert out.stats["label_precision"].item() == pytest.approx(correct)
    assert method.last_kept.tolist() == kept.float().tolist()
    torch.testing.assert_close(method.last_score, score.detach())
    assert method.sieve_seen.tolist() == [1] * 6 and method.sieve_dropped.tolist() == (~kept).long().tolist()
    assert method.dropped_epoch.tolist() == [-1, -1, -1, -1, 2, 2]
    assert set(method.example_state()) == {"last_kept", "last_score", "sieve_seen", "sieve_dropped", "dropped_epoch"}
    assert method.example_weights() is method.last_kept
    record = method.end_epoch(2)
    assert record == {"cores_beta": 2.0, "sieve_on": 1, "lr_divisor": 3.0, "sieve_dropped": 2}
    # the next prior: the noisy labels of the examples not dropped (0, 1, 2, 3: labels 0, 1, 2, 0)
    assert method.prior.tolist() == pytest.approx([0.5, 0.25, 0.25])
    signals = method.audit_signals()
    assert signals["sieve_drop_rate"].score.tolist() == (~kept).double().tolist()
    torch.testing.assert_close(signals["sieve_score"].score, score.detach().double())


def test_cores_keeps_everything_before_the_sieve_and_does_not_count_it():
    method, batch = _cores_step_setup(cores_lr_scaling=False)
    method.start_epoch(1)
    assert not method.sieve_on and method.opt.param_groups[0]["lr"] == 1.0  # no lr scaling asked
    out = method.train_step(batch, None)
    assert out.stats["selected_frac"].item() == 1.0 and method.last_kept.tolist() == [1.0] * 6
    assert method.sieve_seen.sum() == 0 and method.sieve_dropped.sum() == 0
    assert method.end_epoch(1)["sieve_dropped"] == 0 and method.prior.tolist() == pytest.approx([1 / 3] * 3)
    assert method.audit_signals()["sieve_drop_rate"].score.tolist() == [0.0] * 6


# ---- bad options through the CLI --------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--method", "jocor", "--jocor-lambda", "1.5"], "--jocor-lambda must be in [0, 1]"),
        (["--method", "jocor", "--jocor-lambda", "nan"], "--jocor-lambda must be a finite number"),
        (["--method", "jocor", "--jocor-lambda", "-0.1"], "--jocor-lambda must be >= 0"),
        (["--method", "jocor", "--forget-rate", "1"], "--forget-rate must be in [0, 1)"),
        (["--method", "jocor", "--num-gradual", "-1"], "--num-gradual must be >= 0"),
        (["--method", "cores", "--cores-beta", "-1"], "--cores-beta must be >= 0"),
        (["--method", "cores", "--cores-beta", "inf"], "--cores-beta must be a finite number"),
        (["--method", "cores", "--cores-sieve-warmup", "-2"], "--cores-sieve-warmup must be >= 0"),
        (["--method", "cores", "--cores-beta-ramp", "-1"], "--cores-beta-ramp must be >= 0"),
        (["--method", "cores", "--cores-beta-warmup", "-3"], "--cores-beta-warmup must be >= 0"),
    ],
)
def test_bad_options_print_one_line_naming_the_flag(argv, fragment, capsys, tmp_path):
    from nrcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "digits", *argv, "--out", str(tmp_path / "run"), "--quiet"])
    assert exc.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], lines
    assert not (tmp_path / "run").exists()


# ---- end to end on digits ---------------------------------------------------------------------
def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return (pos[:, None] > neg[None, :]).mean() + (pos[:, None] == neg[None, :]).mean() / 2


def _audit(run_dir):
    with np.load(run_dir / "audit.npz") as f:
        meta = json.loads(str(f["meta"]))
        scores = {k[: -len("__score")]: f[k] for k in f.files if k.endswith("__score")}
    noisy = np.load(run_dir / "labels" / "train_labels.npy") != np.load(run_dir / "labels" / "train_true_labels.npy")
    return meta, scores, noisy


def test_jocor_learns_on_digits_and_saves_its_drop_rate(run_tiny):
    summary, run_dir = run_tiny("jocor", noise="sym50", epochs=3, num_gradual=1, jocor_lambda=0.65)
    assert summary["test_acc_last"] > 40  # chance 10%
    records = _records(run_dir)
    assert [r["forget_rate"] for r in records] == pytest.approx([0.0, 0.5, 0.5])
    assert [r["jocor_lambda"] for r in records] == [0.65] * 3
    assert records[0]["selected_frac"] == 1.0 and records[-1]["selected_frac"] == pytest.approx(0.5, abs=0.01)
    assert 0.6 < records[-1]["label_precision"] <= 1  # picks cleaner than the 50% noisy batch
    assert all(r["symmetric_kl"] >= 0 for r in records)
    meta, scores, noisy = _audit(run_dir)
    assert meta["default"] == "drop_rate"
    # kept everything in epoch 1, half of each batch in epochs 2 and 3: a mean drop rate of 1/3
    assert scores["drop_rate"].mean() == pytest.approx(1 / 3, abs=0.01)
    assert _auroc(scores["drop_rate"], noisy) > 0.7


def test_cores_learns_on_digits_and_saves_its_sieve_signals(run_tiny):
    summary, run_dir = run_tiny("cores", noise="sym50", epochs=3)  # beta 0, 2, 2; the sieve from epoch 2
    assert summary["test_acc_last"] > 30 and summary["test_acc_max"] > 50  # chance 10%
    records = _records(run_dir)
    assert [r["cores_beta"] for r in records] == [0.0, 2.0, 2.0]
    assert [r["sieve_on"] for r in records] == [0, 1, 1] and [r["lr_divisor"] for r in records] == [1.0, 3.0, 3.0]
    assert records[0]["selected_frac"] == 1.0 and records[0]["sieve_dropped"] == 0
    assert records[0]["label_precision"] == pytest.approx(0.5, abs=0.03)  # everything kept: the noise rate
    for r in records[1:]:
        assert 0.2 < r["selected_frac"] < 0.9 and r["label_precision"] > 0.6  # the sieve keeps a cleaner part
        assert r["weight_auroc"] > 0.6  # the last decisions, read as example weights
    meta, scores, noisy = _audit(run_dir)
    assert meta["default"] == "sieve_score" and {"sieve_drop_rate", "sieve_score", "weight"} <= set(scores)
    assert _auroc(scores["sieve_drop_rate"], noisy) > 0.65 and _auroc(scores["sieve_score"], noisy) > 0.65
    # the drop rate counts the two sieve epochs only: each example dropped 0, 1 or 2 times of 2
    assert set(np.unique(scores["sieve_drop_rate"])) <= {0.0, 0.5, 1.0}
    n_dropped_last = records[-1]["sieve_dropped"]
    assert int((scores["weight"] == 1).sum()) == n_dropped_last  # score 1 - w: the last decisions are the last epoch's


@pytest.mark.parametrize("method,settings,stop_after", [
    ("jocor", dict(num_gradual=1, jocor_lambda=0.65), 1),
    ("cores", {}, 1),  # stops before the sieve starts
    ("cores", {}, 2),  # stops after a sieve epoch: the next prior and the counts come from the checkpoint
])  # fmt: skip
def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path, tiny_config, method, settings, stop_after):
    from nrcore.train import train

    cfg = tiny_config(method, noise="sym50", epochs=3, **settings)
    full = train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "split", stop_after_epoch=stop_after)["epochs"] == stop_after
    resumed = train(cfg, tmp_path / "split", resume=True)
    assert resumed["test_acc_last"] == full["test_acc_last"]
    for a, b in zip(_records(tmp_path / "full"), _records(tmp_path / "split")):
        for key in ("train_loss", "test_acc", "selected_frac", "label_precision", "forget_rate", "cores_beta", "sieve_dropped"):
            assert a.get(key) == b.get(key), (key, a["epoch"])
    with np.load(tmp_path / "full" / "audit.npz") as f, np.load(tmp_path / "split" / "audit.npz") as g:
        for key in f.files:
            if key.endswith("__score"):
                np.testing.assert_array_equal(f[key], g[key])
