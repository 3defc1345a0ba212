"""The per-example signals a run saves for `nrcore audit` (RUN_DIR/audit.npz): the training
dynamics by hand, every method family's signals in tiny runs, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nrcore.train.dynamics import AUDIT_FILE, TrainingDynamics


def _audit(run_dir):
    with np.load(run_dir / AUDIT_FILE, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays.pop("meta")))


def test_area_under_the_margin_and_mean_prediction_by_hand():
    dyn = TrainingDynamics(3, 3, torch.device("cpu"))
    index, labels = torch.tensor([0, 2]), torch.tensor([1, 0])
    dyn.observe_step(index, labels, torch.tensor([[0.0, 2.0, 1.0], [0.5, 3.0, 0.0]]))  # margins 2 - 1 = 1, 0.5 - 3 = -2.5
    dyn.observe_step(torch.tensor([0]), torch.tensor([1]), torch.tensor([[4.0, 1.0, 0.0]]))  # 1 - 4 = -3
    dyn.observe_step(torch.tensor([1]), torch.tensor([2]), None)  # a step without logits adds nothing
    signals = dyn.signals(final_weights=None)
    assert set(signals) == {"aum"}
    # AUM = mean margin; score = -AUM; example 1 was never seen: 0
    torch.testing.assert_close(signals["aum"].score, torch.tensor([-(1 - 3) / 2, 0.0, 2.5], dtype=torch.float64))
    first = (torch.tensor([0.0, 2.0, 1.0]).softmax(0) + torch.tensor([4.0, 1.0, 0.0]).softmax(0)) / 2
    assert signals["aum"].suggestion[0] == int(first.argmax()) == 0
    assert signals["aum"].suggestion[2] == 1


def test_weight_area_is_one_minus_the_mean_of_the_observed_weights():
    dyn = TrainingDynamics(2, 2, torch.device("cpu"))
    for w in ([0.5, 0.5], [1.0, 0.0], [1.0, 0.1]):
        dyn.observe_weights(torch.tensor(w))
    signals = dyn.signals(final_weights=torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(signals["weight_area"].score, torch.tensor([1 - 2.5 / 3, 1 - 0.6 / 3], dtype=torch.float64))
    torch.testing.assert_close(signals["weight"].score, torch.tensor([0.0, 0.9], dtype=torch.float64))
    assert "aum" not in signals  # no step gave logits


@pytest.mark.parametrize(
    "method, settings, default, expected",
    [
        ("ce", {}, "aum", {"aum", "final_prediction"}),
        ("fbr", {}, "weight_area", {"aum", "weight", "weight_area", "final_prediction"}),
        ("coteaching", {}, "drop_rate", {"aum", "drop_rate", "final_prediction"}),
        ("ebomlc", {}, "corrected_label", {"aum", "corrected_label", "final_prediction"}),
        ("glc", {"epochs": 1}, "final_prediction", {"aum", "final_prediction", "label_posterior"}),
    ],
)
def test_every_family_saves_its_signals(run_tiny, method, settings, default, expected):
    summary, run_dir = run_tiny(method, **settings)
    arrays, meta = _audit(run_dir)
    n = summary["task"]["sizes"]["train"]
    assert set(meta["signals"]) == expected and meta["default"] == default and meta["method"] == method
    for name, info in meta["signals"].items():
        score = arrays[f"{name}__score"]
        assert score.shape == (n,) and np.isfinite(score).all(), name
        assert (f"{name}__suggestion" in arrays) == info["has_suggestion"]
        if info["has_suggestion"]:
            assert arrays[f"{name}__suggestion"].min() >= 0 and arrays[f"{name}__suggestion"].max() < 10
    if method == "ce":
        assert set(meta["absent"]) == {"weight", "weight_area"}
    labels = np.load(run_dir / "labels" / "train_labels.npy")
    # the final model's posterior: its score is 1 - p(given label), so a suggestion equal to the
    # given label means the model agrees with it, and then the score is below 1/2 or the argmax is tied
    agree = arrays["final_prediction__suggestion"] == labels
    assert (arrays["final_prediction__score"][agree] <= 1 - 1 / 10 + 1e-9).all()


def test_a_resumed_run_saves_the_same_signals(tmp_path, tiny_config):
    from nrcore.train import train

    cfg = tiny_config("fbr", epochs=3)
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "cut", stop_after_epoch=1)
    assert not (tmp_path / "cut" / AUDIT_FILE).exists()  # only a finished run has one
    train(cfg, tmp_path / "cut", resume=True)
    whole, whole_meta = _audit(tmp_path / "whole")
    cut, cut_meta = _audit(tmp_path / "cut")
    assert whole_meta == cut_meta and whole.keys() == cut.keys()
    for key in whole:
        np.testing.assert_array_equal(whole[key], cut[key], err_msg=key)
