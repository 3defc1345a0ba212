"""Each baseline end to end through the real trainer on digits (a few seconds each)."""

import json

import pytest


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method,settings",
    [
        ("coteaching", dict(num_gradual=1)),
        ("coteaching-plus", dict(num_gradual=1, init_epoch=1)),
        ("bootstrap", dict(bootstrap_mode="soft")),
        ("bootstrap", dict(bootstrap_mode="hard")),
        ("forward", dict(transition="true")),
    ],
)
def test_single_phase_baselines_learn_on_digits(run_tiny, method, settings):
    summary, run_dir = run_tiny(method, noise="sym50", epochs=3, **settings)
    assert summary["epochs"] == 3
    # chance is 10%; Co-teaching+ updates on the disagreement set only and learns slowly
    assert summary["test_acc_last"] > (20 if method == "coteaching-plus" else 40)
    records = _records(run_dir)
    if method.startswith("coteaching"):
        assert [r["forget_rate"] for r in records] == pytest.approx([0.0, 0.5, 0.5])
        assert 0.5 <= records[-1]["label_precision"] <= 1  # picks are cleaner than the 50% noisy batch
    if method == "coteaching-plus":
        assert [r["disagreement_rule"] for r in records] == [0, 1, 1] and "disagree_frac" in records[-1]


@pytest.mark.parametrize("method,settings", [("glc", {}), ("forward", dict(transition="estimate"))])
def test_phased_baselines_estimate_the_matrix_then_correct(run_tiny, method, settings):
    summary, run_dir = run_tiny(method, noise="pair40", epochs=2, **settings)
    assert summary["epochs"] == summary["epochs_planned"] == 4  # two phases of --epochs each
    records = _records(run_dir)
    assert [r["phase"] for r in records] == [1, 1, 2, 2]
    assert [r["lr"] for r in records[:2]] == [r["lr"] for r in records[2:]]  # each phase: the whole schedule
    assert summary["test_acc_last"] > 30  # chance 10%; two epochs of a fresh network swing by +-10 points
    saved = json.loads((run_dir / "transition.json").read_text())
    assert len(saved["used"]) == 10 and saved["true"] is not None
    # better than guessing "no noise" (identity: row L1 error 0.8 for pair40)
    assert records[-1]["transition_l1_error"] == pytest.approx(saved["row_l1_error"])
    assert saved["row_l1_error"] < 0.8
    if method == "forward":  # default hold-out: its loss after each phase-1 epoch picks the model
        assert all("holdout_nll" in r for r in records[:2]) and not any("holdout_nll" in r for r in records[2:])
        best = min(records[:2], key=lambda r: r["holdout_nll"])["epoch"]
        assert saved["phase1_epoch"] == best and saved["phase1_holdout_examples"] > 0


@pytest.mark.parametrize("method,stop_after", [("glc", 2), ("forward", 1), ("forward", 3), ("coteaching", 1)])
def test_resuming_across_a_phase_boundary_repeats_the_uninterrupted_run(tmp_path, tiny_config, method, stop_after):
    """glc stops after phase 1 (the estimate is made on resume), forward inside phase 1 (its
    best hold-out epoch comes from the checkpoint) and inside phase 2 (the estimate comes from
    the checkpoint), coteaching after its first epoch (two networks)."""
    from nrcore.train import train

    cfg = tiny_config(method, noise="pair40")
    train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "split", stop_after_epoch=stop_after)["epochs"] == stop_after
    train(cfg, tmp_path / "split", resume=True)
    full, split = _records(tmp_path / "full"), _records(tmp_path / "split")
    assert len(full) == len(split) == (2 if method == "coteaching" else 4)
    for a, b in zip(full, split):
        for key in ("train_loss", "test_acc", "val_acc", "lr", "phase", "transition_l1_error", "forget_rate", "holdout_nll"):
            assert a.get(key) == b.get(key), (key, a["epoch"])


def test_phased_methods_select_only_in_their_correcting_phase(run_tiny):
    import json

    summary, run_dir = run_tiny("glc", noise="pair40", epochs=2)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("selectable", True) for r in records] == [False, False, True, True]
    phase2 = records[2:]
    best = max(phase2, key=lambda r: r["val_acc"])
    assert summary["best_val_epoch"] == best["epoch"] and summary["test_acc_best_val"] == best["test_acc"]
    assert summary["test_acc_max"] == max(r["test_acc"] for r in phase2)
