"""`cv_fold` (--cv-fold K/N): K folds of the noisy training set, one held out, for cross-validated
predictions (what cleanlab's recipe needs)."""

from __future__ import annotations

import numpy as np
import pytest

from nrcore.data.task import task_from_dataset

C = 10


@pytest.fixture
def raw(writers):
    return writers.synthetic_raw(np.random.default_rng(2).integers(0, C, 1000), C)


def test_the_folds_partition_the_noisy_set_with_the_same_noisy_labels(raw):
    whole = task_from_dataset(raw, "sym40", clean_size=100, val_size=100, seed=3)
    label_of = dict(zip(whole.train.source_index.tolist(), whole.train.labels.tolist()))
    held = []
    for k in range(1, 6):
        task = task_from_dataset(raw, "sym40", clean_size=100, val_size=100, seed=3, cv_fold=(k, 5))
        train_ids, held_ids = set(task.train.source_index.tolist()), set(task.holdout.source_index.tolist())
        assert not train_ids & held_ids and train_ids | held_ids == set(label_of)
        for split in (task.train, task.holdout):  # noise first, folds after: the labels do not move
            assert all(label_of[i] == y for i, y in zip(split.source_index.tolist(), split.labels.tolist()))
        # the trusted and validation splits are those of the run without folds
        assert task.clean.source_index.tolist() == whole.clean.source_index.tolist()
        assert task.val.source_index.tolist() == whole.val.source_index.tolist()
        held.append(held_ids)
        assert task.info["cv_fold"]["fold"] == k and task.info["sizes"]["holdout"] == len(held_ids)
    assert set().union(*held) == set(label_of) and sum(len(h) for h in held) == len(label_of)


def test_the_folds_are_stratified_by_the_noisy_label(raw):
    task = task_from_dataset(raw, "sym40", clean_size=100, seed=1, cv_fold=(2, 4))
    all_counts = np.bincount(np.r_[task.train.labels.numpy(), task.holdout.labels.numpy()], minlength=C)
    held_counts = np.bincount(task.holdout.labels.numpy(), minlength=C)
    assert (np.abs(held_counts - all_counts / 4) <= 1).all()


@pytest.mark.parametrize("fold", [(0, 5), (6, 5), (1, 1)])
def test_bad_folds_name_the_flag(raw, fold):
    with pytest.raises(ValueError, match="--cv-fold must be K/N"):
        task_from_dataset(raw, "clean", seed=0, cv_fold=fold)


def test_the_config_reads_k_of_n(tiny_config):
    from nrcore.train.config import parse_cv_fold

    assert parse_cv_fold("2/5") == (2, 5)
    for bad in ("2", "a/b", "0/3", "4/3"):
        with pytest.raises(ValueError, match="--cv-fold must be K/N"):
            parse_cv_fold(bad)


def test_a_fold_run_saves_the_held_out_posterior(run_tiny):
    summary, run_dir = run_tiny("ce", epochs=1, cv_fold="3/5")
    with np.load(run_dir / "audit.npz") as f:
        probs, index = f["holdout__probs"], f["holdout__source_index"]
    assert probs.shape == (summary["task"]["sizes"]["holdout"], 10) and np.allclose(probs.sum(1), 1)
    assert index.tolist() == np.load(run_dir / "labels" / "holdout_source_index.npy").tolist()
