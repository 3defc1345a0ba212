"""Symmetric cross entropy (`sce`) and early-learning regularisation (`elr`): their losses on
hand-made tensors, one step of each method against a by-hand computation, option errors through
the CLI, tiny digits runs (learning, audit signals, exact resume)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nrcore.methods.elr import EarlyLearningRegularization, elr_update_and_regulariser
from nrcore.methods.sce import SymmetricCrossEntropy, sce_terms


def _logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


# ---- SCE: the loss ----------------------------------------------------------------------------
def test_sce_terms_by_hand():
    logits = _logits_of([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    ce, rce = sce_terms(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(ce, torch.tensor([-math.log(0.2), -math.log(0.7)]))
    # RCE = -sum_c p_c log q_c, log 0 := -4, log 1 = 0: 4 times the mass off the label
    torch.testing.assert_close(rce, torch.tensor([4 * 0.8, 4 * 0.3]))


def test_sce_rce_with_the_authors_clip_is_the_paper_rce_scaled_by_2_30():
    """The authors' code: -sum p log clip(one_hot, 1e-4, 1), i.e. A = ln(1e-4) = -9.21."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    p = logits.softmax(dim=1)
    authors = -(p * torch.log(F.one_hot(labels, 5).float().clamp(1e-4, 1.0))).sum(dim=1)
    _, as_code = sce_terms(logits, labels, log_zero=math.log(1e-4))
    torch.testing.assert_close(as_code, authors)
    _, paper = sce_terms(logits, labels)
    torch.testing.assert_close(authors, paper * math.log(1e4) / 4)  # 9.2103 / 4 = 2.3026


def test_sce_rce_is_bounded_and_symmetric():
    """The paper's robustness argument: RCE lies in [0, -A] and its sum over all labels is the
    constant -A (C - 1), whatever the prediction."""
    torch.manual_seed(1)
    logits = torch.randn(8, 4) * 5
    per_label = torch.stack([sce_terms(logits, torch.full((8,), c))[1] for c in range(4)], dim=1)
    assert bool((per_label >= 0).all()) and bool((per_label <= 4).all())
    torch.testing.assert_close(per_label.sum(dim=1), torch.full((8,), 4.0 * 3))


def test_sce_ce_is_clipped_at_1e_7_as_in_the_authors_code():
    logits = torch.tensor([[0.0, 30.0, 30.0]], requires_grad=True)  # p_0 = e^-30 / 2 < 1e-7
    ce, rce = sce_terms(logits, torch.tensor([0]))
    assert ce.item() == pytest.approx(-math.log(1e-7), rel=1e-6)  # 16.12, not 30.69
    assert F.cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(30 + math.log(2), rel=1e-6)
    ce.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))  # the clip stops CE's gradient there
    assert rce.item() == pytest.approx(4.0, rel=1e-6)


def test_sce_gradient_by_hand():
    # d CE / dz = p - e_y;  d RCE / dz_k = A p_y (delta_yk - p_k), A = -4
    logits = _logits_of([[0.7, 0.2, 0.1]]).requires_grad_(True)
    ce, rce = sce_terms(logits, torch.tensor([1]))
    (0.1 * ce + 1.0 * rce).sum().backward()
    p, e = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.0, 1.0, 0.0])
    expected = 0.1 * (p - e) + 1.0 * (-4) * 0.2 * (e - p)
    torch.testing.assert_close(logits.grad[0], expected)


# ---- one step of each method -------------------------------------------------------------------
def _linear_ctx(task, lr):
    from nrcore.methods.base import MethodContext, OptimConfig

    torch.manual_seed(0)
    factory = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, task.num_classes))  # noqa: E731
    return MethodContext(task, "cpu", factory, OptimConfig(lr=lr, momentum=0.0, weight_decay=0.0), epochs=1, batch_size=8, seed=0)


def _batch(task, rows):
    from nrcore.data.loader import Batch

    x = task.train.images[rows].float() / 255.0
    return Batch(x=x, y=task.train.labels[rows], index=torch.tensor(rows))


def test_sce_step_trains_on_alpha_ce_plus_beta_rce(digits_task):
    method = SymmetricCrossEntropy(_linear_ctx(digits_task, lr=0.5), sce_alpha=0.3, sce_beta=2.0)
    batch = _batch(digits_task, [3, 1, 4, 6, 9, 2, 7])
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, digits_task.num_classes))
    reference.load_state_dict(method.model.state_dict())
    # the authors' formula written out, with the paper's A = -4 (one-hot clipped to e^-4)
    p = reference(batch.x).softmax(dim=1)
    q = F.one_hot(batch.y, digits_task.num_classes).float()
    ce = -(q * torch.log(p.clamp(1e-7, 1.0))).sum(dim=1).mean()
    rce = -(p * torch.log(q.clamp(math.exp(-4), 1.0))).sum(dim=1).mean()
    loss = 0.3 * ce + 2.0 * rce
    loss.backward()
    out = method.train_step(batch, None)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert out.stats["ce"].item() == pytest.approx(ce.item(), rel=1e-5) and out.stats["rce"].item() == pytest.approx(rce.item(), rel=1e-5)
    for new, old in zip(method.model.parameters(), reference.parameters()):  # plain SGD: w - lr grad
        torch.testing.assert_close(new.detach(), (old - 0.5 * old.grad).detach())


# ---- ELR: the target and the regulariser ---------------------------------------------------------
def test_elr_target_and_regulariser_by_hand():
    first = _logits_of([[0.7, 0.2, 0.1]])
    targets, reg = elr_update_and_regulariser(first, torch.zeros(1, 3), beta=0.7)
    torch.testing.assert_close(targets, torch.tensor([[0.21, 0.06, 0.03]]))  # 0.3 p
    # <p, t> = 0.147 + 0.012 + 0.003 = 0.162
    assert reg.item() == pytest.approx(math.log(1 - 0.162), rel=1e-5)
    second = _logits_of([[0.5, 0.3, 0.2]])
    targets, reg = elr_update_and_regulariser(second, targets, beta=0.7)
    torch.testing.assert_close(targets, torch.tensor([[0.297, 0.132, 0.081]]))  # 0.7 t + 0.3 p
    assert reg.item() == pytest.approx(math.log(1 - (0.1485 + 0.0396 + 0.0162)), rel=1e-5)


def test_elr_clamp_keeps_the_regulariser_finite():
    """A confident prediction equal to its target would give log(1 - 1); the authors' clamp of p
    to [1e-4, 1 - 1e-4] (and the target's normalisation) keeps 1 - <p, t> at about 3e-4."""
    targets, reg = elr_update_and_regulariser(torch.tensor([[50.0, 0.0, 0.0]]), torch.zeros(1, 3), beta=0.0)
    p = [1 - 1e-4, 1e-4, 1e-4]
    t = [v / sum(p) for v in p]
    torch.testing.assert_close(targets, torch.tensor([t]))
    inner = sum(a * b for a, b in zip(p, t))
    assert reg.item() == pytest.approx(math.log(1 - inner), rel=1e-3)  # about -8.1


def test_elr_target_gets_no_gradient():
    logits = torch.tensor([[1.0, -0.5, 0.3], [0.2, 0.1, -1.0]], requires_grad=True)
    old = torch.tensor([[0.2, 0.3, 0.1], [0.0, 0.5, 0.2]])
    targets, reg = elr_update_and_regulariser(logits, old, beta=0.6)
    reg.sum().backward()
    assert not targets.requires_grad
    reference = logits.detach().clone().requires_grad_(True)
    p = reference.softmax(dim=1).clamp(1e-4, 1 - 1e-4)
    torch.log(1 - (targets * p).sum(dim=1)).sum().backward()  # the target as a constant
    torch.testing.assert_close(logits.grad, reference.grad)


def test_elr_step_updates_the_batch_rows_of_the_targets_and_trains_on_ce_plus_lambda_reg(digits_task):
    """lr 0 keeps the model fixed, so two steps on one batch see the same prediction p: the
    targets are (1 - beta) q and then (1 - beta^2) q (q = p^ normalised), other rows stay 0."""
    method = EarlyLearningRegularization(_linear_ctx(digits_task, lr=0.0), elr_lambda=3.0, elr_beta=0.7)
    rows = [5, 0, 7, 12]
    batch = _batch(digits_task, rows)
    with torch.no_grad():
        logits = method.model(batch.x)
    p = logits.softmax(dim=1).clamp(1e-4, 1 - 1e-4)
    q = p / p.sum(dim=1, keepdim=True)
    ce = F.cross_entropy(logits, batch.y)
    for visit, mass in ((1, 0.3), (2, 1 - 0.7**2)):
        out = method.train_step(batch, None)
        torch.testing.assert_close(method.targets[rows], mass * q)
        reg = torch.log(1 - mass * (q * p).sum(dim=1)).mean()
        assert out.loss.item() == pytest.approx((ce + 3.0 * reg).item(), rel=1e-5), visit
        assert out.stats["elr_reg"].item() == pytest.approx(reg.item(), rel=1e-5)
    others = torch.ones(digits_task.train.labels.shape[0], dtype=torch.bool)
    others[rows] = False
    assert float(method.targets[others].abs().sum()) == 0
    state = method.example_state()
    assert list(state) == ["targets"] and state["targets"] is method.targets  # gathered under torchrun
    assert "targets" in method.state_dict()  # checkpointed


def test_elr_audit_signal_and_epoch_numbers_read_the_normalised_targets(digits_task):
    method = EarlyLearningRegularization(_linear_ctx(digits_task, lr=0.0))
    labels, true = digits_task.train.labels, digits_task.train.true_labels
    n, c = method.targets.shape
    # example 0: mass 0.3 (one visit), 0.6 of it on its label; example 1: all on label + 1; others unvisited
    method.targets[0] = 0.3 * F.one_hot(labels[0], c).float() * 0.6 + 0.3 * 0.4 * F.one_hot((labels[0] + 1) % c, c).float()
    method.targets[1] = 0.5 * F.one_hot((labels[1] + 1) % c, c).float()
    signal = method.audit_signals()["elr_target"]
    assert EarlyLearningRegularization.audit_default == "elr_target"
    assert signal.score[0].item() == pytest.approx(0.4) and signal.suggestion[0].item() == labels[0].item()
    assert signal.score[1].item() == pytest.approx(1.0) and signal.suggestion[1].item() == (labels[1].item() + 1) % c
    assert signal.score[2].item() == pytest.approx(1 - 1 / c)  # unvisited: uniform
    numbers = method.end_epoch(0)
    guess = method.targets.argmax(dim=1)
    assert numbers["elr_target_agree"] == pytest.approx(float((guess == labels).double().mean()))
    assert numbers["elr_target_acc"] == pytest.approx(float((guess == true).double().mean()))


# ---- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--method", "sce", "--sce-alpha", "-1"], "--sce-alpha must be >= 0"),
        (["--method", "sce", "--sce-beta", "nan"], "--sce-beta must be a finite number"),
        (["--method", "sce", "--sce-alpha", "0", "--sce-beta", "0"], "--sce-alpha and --sce-beta are both 0"),
        (["--method", "elr", "--elr-lambda", "-0.5"], "--elr-lambda must be >= 0"),
        (["--method", "elr", "--elr-beta", "1"], "--elr-beta must be < 1"),
        (["--method", "elr", "--elr-beta", "-0.1"], "--elr-beta must be >= 0"),
        (["--method", "elr", "--elr-lambda", "inf"], "--elr-lambda must be a finite number"),
    ],
)
def test_bad_options_print_one_line_naming_the_flag(argv, fragment, capsys, tmp_path):
    from nrcore.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--dataset", "digits", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code != 0 and len(lines) == 1, err
    assert lines[0].startswith("error:") and fragment in lines[0], err
    assert not (tmp_path / "run").exists()


def test_defaults_are_the_papers_cifar10_values():
    assert {o.name: o.default for o in SymmetricCrossEntropy.options} == {"sce_alpha": 0.1, "sce_beta": 1.0}
    assert {o.name: o.default for o in EarlyLearningRegularization.options} == {"elr_lambda": 3.0, "elr_beta": 0.7}


# ---- end to end ----------------------------------------------------------------------------------
def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _auroc(scores, positive):
    """Probability that a positive outranks a negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return greater + ties / 2


def test_sce_learns_on_digits_and_leaves_the_audit_to_the_trainer(run_tiny):
    summary, run_dir = run_tiny("sce", noise="sym50", epochs=3)
    assert summary["test_acc_last"] > 40  # chance 10%
    records = _records(run_dir)
    for r in records:  # the loss is the weighted sum of its two averaged terms
        assert r["train_loss"] == pytest.approx(0.1 * r["ce"] + 1.0 * r["rce"], rel=1e-6)
        assert 0 <= r["rce"] <= 4
    with np.load(run_dir / "audit.npz") as f:
        meta = json.loads(str(f["meta"]))
    assert set(meta["signals"]) == {"aum", "final_prediction"} and meta["default"] == "aum"


def test_elr_learns_on_digits_and_saves_its_target_signal(run_tiny, digits_task):
    summary, run_dir = run_tiny("elr", noise="sym50", epochs=3)
    assert summary["test_acc_last"] > 40
    records = _records(run_dir)
    for r in records:
        assert r["train_loss"] == pytest.approx(r["ce"] + 3.0 * r["elr_reg"], rel=1e-6) and r["elr_reg"] < 0
    # half the labels are wrong; the ensemble's argmax is right far more often than the labels
    assert records[-1]["elr_target_acc"] > 0.7 > records[-1]["elr_target_agree"]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["method"]["targets"].double()
    with np.load(run_dir / "audit.npz") as f:
        meta = json.loads(str(f["meta"]))
        score, suggestion = f["elr_target__score"], f["elr_target__suggestion"]
    assert meta["default"] == "elr_target"
    from nrcore.data import build_task

    cfg = json.loads((run_dir / "config.json").read_text())
    task = build_task("digits", noise="sym50", clean_size=cfg["clean_size"], val_size=cfg["val_size"], seed=cfg["seed"])
    normalised = state / state.sum(dim=1, keepdim=True)  # every example was visited
    np.testing.assert_allclose(score, (1 - normalised.gather(1, task.train.labels[:, None])[:, 0]).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(suggestion, state.argmax(dim=1).numpy())
    assert _auroc(score, task.train.is_noisy.numpy()) > 0.8


@pytest.mark.parametrize("method", ["sce", "elr"])
def test_a_resumed_run_repeats_the_uninterrupted_one(tmp_path, tiny_config, method):
    from nrcore.train import train

    cfg = tiny_config(method, noise="sym50", epochs=3)
    whole = train(cfg, tmp_path / "whole")
    assert train(cfg, tmp_path / "cut", stop_after_epoch=1)["epochs"] == 1
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["test_acc_last"] == whole["test_acc_last"]
    for a, b in zip(_records(tmp_path / "whole"), _records(tmp_path / "cut"), strict=True):
        for key in ("train_loss", "test_acc", "val_acc", "ce", "rce", "elr_reg", "elr_target_agree", "elr_target_acc"):
            assert a.get(key) == b.get(key), (key, a["epoch"])
    if method == "elr":
        saved = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["method"]["targets"] for d in ("whole", "cut")]
        assert torch.equal(*saved)
