"""bench/class_means.py: class means and the pair split on hand-made features, and the report on
a tiny real fbr run."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def cm(bench_script):
    return bench_script("class_means")


def test_centred_class_means_and_positive_pairs(cm):
    # classes 0 and 1 sit on the same side of the mean, class 2 on the other; class 3 is absent
    feats = torch.tensor([[2.0, 0.0], [4.0, 0.0], [3.0, 1.0], [3.0, 3.0], [-6.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    means = cm.centred_class_means(feats, labels, 4)
    mu = feats.mean(0)
    expected = torch.stack([feats[:2].mean(0) - mu, feats[2:4].mean(0) - mu, feats[4] - mu, torch.zeros(2, dtype=torch.float64)])
    torch.testing.assert_close(means, expected)
    given = np.array([1, 0, 2, 0, 3, 1])
    true = np.array([0, 1, 0, 2, 0, 1])
    # (0,1) and (1,0) point the same way, (0,2) and (2,0) not, the absent class pairs with nothing,
    # and a clean example pairs with itself
    assert cm.positive_pairs(means, given, true).tolist() == [True, True, False, False, False, True]


def test_report_on_a_tiny_fbr_run(cm, run_tiny, capsys):
    summary, run_dir = run_tiny("fbr", "sym50", epochs=1)
    assert cm.main([str(run_dir), str(run_dir.parent / "missing")]) == 0
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith(f"| {run_dir} "))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    top1, top3, pos, w_pos, w_neg, w_clean, auc, auc_without = cells
    assert 0 < top1 <= top3 <= 1 and 0 <= pos <= 1
    assert all(0 <= w <= 1 for w in (w_pos, w_neg, w_clean)) and 0 <= auc <= 1 and 0 <= auc_without <= 1
    assert "skipped" in err and "missing" in err
    # the columns that need no network agree with the run's own files
    with np.load(run_dir / "weights.npz") as data:
        weights, noisy = data["final_weights"], data["is_noisy"]
    assert w_clean == pytest.approx(weights[~noisy].mean(), abs=0.005)
    assert auc == pytest.approx(summary["weight_auroc_last"], abs=0.0005)
