"""The reweighting family end to end on digits through the real trainer: runs, learns, and
leaves the per-example weight analysis (metrics and weights.npz) in the run directory."""

import json

import numpy as np
import pytest

from nrcore.train import resolve_config, train


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_weights(run_dir, epochs, summary):
    records = _records(run_dir)
    for r in records:
        assert 0 <= r["weight_mean_clean"] <= 1 and 0 <= r["weight_mean_noisy"] <= 1
        assert 0 <= r["weight_auroc"] <= 1
    assert summary["weight_auroc_last"] == records[-1]["weight_auroc"]
    data = np.load(run_dir / "weights.npz")
    final, noisy = data["final_weights"], data["is_noisy"]
    assert final.shape == noisy.shape and final.min() >= 0 and final.max() <= 1
    times = data["trajectory_epochs"]
    assert data["trajectories"].shape == (len(times), len(data["tracked_index"]))
    assert times[0] == 0 and times[-1] == epochs and (np.diff(times) > 0).all()
    np.testing.assert_array_equal(data["trajectories"][-1], final[data["tracked_index"]])
    return records, final, noisy


@pytest.mark.parametrize(
    "method,settings,min_acc,min_auroc",
    [
        ("fbr", dict(lambda_schedule="linear", lambda_neg_end=0.0), 60, 0.9),
        ("fbr-ntk", dict(batch_size=128), 40, 0.8),
        ("meta", dict(batch_size=128), 40, 0.6),
        ("l2rw", dict(batch_size=128, hypergrad="tangent"), 40, 0.5),  # the recorder on a train-mode BN model
        ("mwnet", dict(batch_size=128), 30, None),
    ],
)
def test_reweighting_methods_learn_on_digits(run_tiny, method, settings, min_acc, min_auroc):
    summary, run_dir = run_tiny(method, noise="sym50", epochs=2, **settings)
    records, final, noisy = _check_weights(run_dir, 2, summary)
    assert summary["test_acc_last"] > min_acc  # chance: 10%
    if min_auroc is not None:
        assert records[-1]["weight_auroc"] > min_auroc
        assert final[~noisy].mean() > final[noisy].mean()
    if method == "fbr":  # linear λ- schedule from 1/(C-1) to 0 over the run
        assert [r["lambda_neg"] for r in records] == pytest.approx([1 / 9, 0.0])


def test_fbr_ntk_resumes_exactly(tmp_path):
    """Per-epoch state (sign vector, clean statistics) is rebuilt on resume; the weights and the
    model come back from the checkpoint."""
    settings = dict(dataset="digits", method="fbr-ntk", noise="sym50", epochs=2, batch_size=128, clean_size=100, val_size=0, threads=1)
    cfg = resolve_config(cli=settings, cli_method_options={})
    straight = train(cfg, tmp_path / "straight")
    from nrcore.train.trainer import Trainer

    Trainer(cfg, tmp_path / "resumed", stop_after_epoch=1).run()
    resumed = train(cfg, tmp_path / "resumed", resume=True)
    assert resumed["test_acc_last"] == straight["test_acc_last"]
    a, b = np.load(tmp_path / "straight" / "weights.npz"), np.load(tmp_path / "resumed" / "weights.npz")
    np.testing.assert_array_equal(a["final_weights"], b["final_weights"])


def test_presets_resolve_to_the_fbr_paper_setting():
    cfg = resolve_config(cli={"preset": None}, cli_method_options={}, preset="fbr-cifar10")
    assert (cfg.method, cfg.dataset, cfg.model, cfg.epochs, cfg.batch_size, cfg.lr) == ("fbr", "cifar10", "resnet34", 120, 128, 0.02)
    assert (cfg.milestones, cfg.clean_size, cfg.clean_frac, cfg.weight_decay) == ([40, 80, 100], 2000, None, 5e-4)
    assert resolve_config(cli={}, cli_method_options={}, preset="fbr-cifar100").dataset == "cifar100"
