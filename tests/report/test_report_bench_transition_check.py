"""bench/transition_check.py: the corrected loss's per-class optimum on hand-made matrices, and
the report on a tiny real forward run."""

from __future__ import annotations


import pytest
import torch


@pytest.fixture(scope="module")
def check(bench_script):
    return bench_script("transition_check")


def symmetric(num_classes: int, diag: float) -> torch.Tensor:
    off = (1 - diag) / (num_classes - 1)
    return torch.full((num_classes, num_classes), off) + (diag - off) * torch.eye(num_classes)


def test_optimum_is_one_hot_on_the_true_class_when_the_matrix_is_right(check):
    truth = symmetric(4, 0.4)
    optimum = check.corrected_loss_optimum(truth, truth)
    # EM approaches a vertex of the simplex slowly (sublinearly): close, not exact
    torch.testing.assert_close(optimum, torch.eye(4, dtype=torch.float64), atol=1e-3, rtol=0)


def test_optimum_matches_a_brute_force_search_over_the_simplex(check):
    # 3 classes, a used matrix unlike the truth: compare with the best point of a fine grid
    truth = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    used = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.5, 0.3], [0.3, 0.1, 0.6]], dtype=torch.float64)
    optimum = check.corrected_loss_optimum(truth, used)
    steps = torch.linspace(0, 1, 201, dtype=torch.float64)
    a, b = torch.meshgrid(steps, steps, indexing="ij")
    grid = torch.stack([a, b, 1 - a - b], -1).reshape(-1, 3)
    grid = grid[grid[:, 2] >= -1e-12].clamp_min(0)
    for i in range(3):
        objective = (truth[i] * (grid @ used).clamp_min(1e-300).log()).sum(1)
        best = objective.max()
        reached = (truth[i] * (optimum[i] @ used).log()).sum()
        assert reached >= best - 1e-9
        assert reached <= best + 1e-3  # the grid's spacing bounds how much better EM may be


def test_flattened_and_uneven_estimate_sends_a_class_to_another(check):
    # Under the true sym80-like noise, an estimate whose column 0 is dominated by row 1 makes the
    # corrected loss prefer class 1 for true class 0.
    truth = symmetric(3, 0.5)
    used = torch.tensor([[0.34, 0.33, 0.33], [0.40, 0.35, 0.25], [0.2, 0.2, 0.6]], dtype=torch.float64)
    optimum = check.corrected_loss_optimum(truth, used)
    assert optimum[0].argmax() != 0
    assert optimum[2].argmax() == 2


def test_bad_matrices_are_rejected_by_name(check):
    with pytest.raises(ValueError, match="same square shape"):
        check.corrected_loss_optimum(torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="used_matrix"):
        check.corrected_loss_optimum(torch.eye(2), torch.tensor([[0.5, 0.6], [0.5, 0.5]]))


def test_report_on_a_tiny_forward_run(check, run_tiny, capsys):
    _, run_dir = run_tiny("forward", "pair40", transition="true", epochs=1)
    assert check.main([str(run_dir), str(run_dir.parent / "missing")]) == 0
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith(f"| {run_dir} "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.00" and cells[2] == "10/10"  # the true matrix: every class's optimum is right
    assert len(cells[6].split()) == 10  # a recall per class
    assert "skipped" in err and "missing" in err
