"""The trusted set and the validation split: balanced, disjoint from the noisy set, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nrcore.data import build_task
from nrcore.data.splits import largest_remainder
from nrcore.data.task import task_from_dataset

C = 10


@pytest.fixture(scope="module")
def raw():
    from nrcore.data.datasets import Pool, RawDataset

    rng = np.random.default_rng(1)
    labels = rng.choice(C, size=3000, p=np.linspace(1, 2, C) / np.linspace(1, 2, C).sum())  # unbalanced classes
    n = len(labels)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    return RawDataset(
        "synthetic", C, (1, 2, 2), [str(c) for c in range(C)], (0.5,), (0.25,), None,
        Pool(labels.astype(np.int64), np.arange(n, dtype=np.int64), images=images),
        Pool(np.arange(10, dtype=np.int64), np.arange(10, dtype=np.int64), images=torch.zeros(10, 1, 2, 2, dtype=torch.uint8)),
    )  # fmt: skip


def _ids(split) -> set:
    return set(split.source_index.tolist())


def test_trusted_set_is_balanced_on_the_original_labels(raw):
    task = task_from_dataset(raw, "sym80", clean_size=500, seed=3)
    counts = np.bincount(task.clean.labels.numpy(), minlength=C)
    assert (counts == 50).all()
    assert torch.equal(task.clean.labels, torch.from_numpy(raw.train.labels[task.clean.source_index.numpy()]))
    assert task.info["clean_per_class"] == [50] * C


def test_trusted_set_shares_no_example_with_the_noisy_training_set(raw):
    task = task_from_dataset(raw, "sym50", clean_size=300, val_size=200, seed=0)
    train, clean, val = _ids(task.train), _ids(task.clean), _ids(task.val)
    assert not train & clean, f"{len(train & clean)} trusted examples are also in the noisy training set"
    assert not train & val and not clean & val
    assert len(train) + len(clean) + len(val) == len(raw.train)  # nothing lost either


def test_disjointness_check_fails_when_one_index_is_shared(raw):
    task = task_from_dataset(raw, "sym50", clean_size=300, seed=0)
    leaked = torch.cat([task.train.source_index, task.clean.source_index[:1]])
    assert len(set(leaked.tolist()) & _ids(task.clean)) == 1  # the check above would catch this


def test_splits_are_reproducible_in_the_seed(raw):
    a = task_from_dataset(raw, "sym50", clean_size=300, val_size=200, seed=5)
    b = task_from_dataset(raw, "sym50", clean_size=300, val_size=200, seed=5)
    c = task_from_dataset(raw, "sym50", clean_size=300, val_size=200, seed=6)
    for name in ("train", "clean", "val"):
        assert torch.equal(getattr(a, name).source_index, getattr(b, name).source_index)
    assert not torch.equal(a.clean.source_index, c.clean.source_index)


def test_larger_trusted_set_contains_the_smaller_and_val_does_not_move(raw):
    small = task_from_dataset(raw, "clean", clean_size=100, val_size=300, seed=2)
    large = task_from_dataset(raw, "clean", clean_size=800, val_size=300, seed=2)
    assert _ids(small.clean) <= _ids(large.clean)
    assert torch.equal(small.val.source_index, large.val.source_index)


def test_size_rounds_to_whole_per_class_counts_and_is_reported(raw):
    task = task_from_dataset(raw, "clean", clean_size=1006, seed=0)
    assert len(task.clean) == 1010 and task.info["sizes"]["clean"] == 1010
    assert task.info["clean_per_class_requested"] == 101
    assert "1006" in task.info["clean_rule"] and "1010" in task.info["clean_rule"]
    frac = task_from_dataset(raw, "clean", clean_frac=0.02, seed=0)  # 2% of 3000 = 60 -> 6 per class
    assert len(frac.clean) == 60 and frac.info["clean_frac_requested"] == 0.02


def test_val_keeps_class_proportions_and_takes_counts_or_fractions(raw):
    task = task_from_dataset(raw, "clean", val_size=0.1, seed=0)
    assert len(task.val) == 300 and task.clean is None
    counts = np.bincount(raw.train.labels, minlength=C)
    assert task.info["val_per_class"] == largest_remainder(counts, 300).tolist()
    assert len(task_from_dataset(raw, "clean", val_size=250).val) == 250
    assert len(task_from_dataset(raw, "clean", val_size=250.0).val) == 250
    assert task_from_dataset(raw, "clean").val is None


def test_use_clean_in_train_appends_the_trusted_examples_and_is_recorded(raw):
    base = task_from_dataset(raw, "sym60", clean_size=200, seed=1)
    mixed = task_from_dataset(raw, "sym60", clean_size=200, seed=1, use_clean_in_train=True)
    assert len(mixed.train) == len(base.train) + 200
    assert torch.equal(mixed.train.source_index[-200:], mixed.clean.source_index)
    assert torch.equal(mixed.train.labels[-200:], mixed.clean.labels)
    assert torch.equal(mixed.train.labels[:-200], base.train.labels)
    assert mixed.info["use_clean_in_train"] is True and base.info["use_clean_in_train"] is False
    assert mixed.info["train_label_error_rate"] < base.info["train_label_error_rate"]
    assert mixed.noise_rate_realized == base.noise_rate_realized  # the rate of the noisy part


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(clean_size=100, clean_frac=0.1), "not both"),
        (dict(clean_size=-1), "clean_size"),
        (dict(clean_size=2.5), "clean_size"),
        (dict(clean_frac=1.5), "clean_frac"),
        (dict(clean_size=4), r"rounds to 0 .* ask for at least 5 \(--clean-size"),
        (dict(clean_size=100000), r"trusted set needs 10000 examples of class 0 but only \d+ are available; the largest it can be here is \d+ \(--clean-size \d+ or --clean-frac 0\.\d+\)"),
        (dict(val_size=-3), "val_size"),
        (dict(val_size=12.5), "val_size"),
        (dict(val_size=5000), r"val size 5000 exceeds .* \(--val-size\)"),
        (dict(use_clean_in_train=True), "trusted set"),
    ],
)
def test_bad_split_arguments_name_the_argument(raw, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task_from_dataset(raw, "sym50", **kwargs)


def test_val_and_trusted_cannot_overlap(raw):
    smallest = int(np.bincount(raw.train.labels).min())
    with pytest.raises(ValueError, match="left after the trusted set"):
        task_from_dataset(raw, "clean", clean_size=C * (smallest - 5), val_size=0.5)


def test_digits_has_a_fixed_stratified_test_split():
    a = build_task("digits", seed=0)
    b = build_task("digits", seed=7, noise="sym30", clean_size=100)
    assert torch.equal(a.test.source_index, b.test.source_index)  # the test split ignores the run seed
    assert len(a.test) == 360 and len(a.train) == 1437
    counts = np.bincount(a.test.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert not set(a.test.source_index.tolist()) & set(a.train.source_index.tolist())
