"""`train_size` (--train-size): a class-balanced training subset drawn from the data seed, with
the trusted and validation splits taken from the rest of the pool."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nrcore.data import build_task, save_task_labels
from nrcore.data.task import task_from_dataset

C = 10


@pytest.fixture
def raw(writers):
    """3,000 pool examples over unbalanced classes (200 of class 0 up to 400 of class 9)."""
    labels = np.concatenate([np.full(200 + round(200 * c / (C - 1)), c) for c in range(C)])
    return writers.synthetic_raw(np.random.default_rng(4).permutation(labels), C)


def _ids(split) -> set:
    return set(split.source_index.tolist())


def test_the_subset_is_class_balanced_on_the_original_labels(raw):
    task = task_from_dataset(raw, "sym60", train_size=1000, seed=0)
    assert len(task.train) == 1000
    assert np.bincount(task.train.true_labels.numpy(), minlength=C).tolist() == [100] * C
    assert task.info["train_subset"]["per_class"] == [100] * C
    # a size that does not divide: the remainder goes to the lowest class ids
    odd = task_from_dataset(raw, "clean", train_size=1003, seed=0)
    assert np.bincount(odd.train.true_labels.numpy(), minlength=C).tolist() == [101] * 3 + [100] * 7


def test_trusted_and_validation_splits_come_from_outside_the_subset(raw):
    task = task_from_dataset(raw, "sym60", train_size=1000, clean_size=200, val_size=300, seed=1)
    train, clean, val = _ids(task.train), _ids(task.clean), _ids(task.val)
    assert len(train) == 1000 and len(clean) == 200 and len(val) == 300
    assert not train & clean and not train & val and not clean & val
    assert len(train | clean | val) == 1500  # nothing lost, nothing counted twice
    # the trusted and validation examples keep their clean labels
    assert (task.clean.labels == task.clean.true_labels).all() and (task.val.labels == task.val.true_labels).all()


def test_fractions_are_of_the_subset(raw):
    task = task_from_dataset(raw, "clean", train_size=1000, clean_frac=0.1, val_size=0.05, seed=0)
    assert len(task.clean) == 100 and len(task.val) == 50


def test_the_data_seed_fixes_the_subset_and_the_run_seed_does_not_move_it(raw):
    a = task_from_dataset(raw, "sym60", train_size=1000, clean_size=100, seed=0)
    b = task_from_dataset(raw, "sym60", train_size=1000, clean_size=100, seed=5)
    c = task_from_dataset(raw, "sym60", train_size=1000, clean_size=100, seed=0, data_seed=1)
    assert _ids(a.train) == _ids(b.train)
    assert _ids(a.train) != _ids(c.train)
    assert not np.array_equal(a.train.labels.numpy(), b.train.labels.numpy())  # the noise follows the run seed
    assert a.info["train_subset"]["data_seed"] == 0 and c.info["train_subset"]["data_seed"] == 1


def test_a_noisy_label_does_not_depend_on_the_subset_size(raw):
    small = task_from_dataset(raw, "sym60", train_size=500, seed=2)
    large = task_from_dataset(raw, "sym60", train_size=1500, seed=2)
    full = task_from_dataset(raw, "sym60", seed=2)
    by_id = dict(zip(full.train.source_index.tolist(), full.train.labels.tolist()))
    for task in (small, large):
        assert all(by_id[i] == y for i, y in zip(task.train.source_index.tolist(), task.train.labels.tolist()))


def test_the_data_seed_is_recorded_in_the_saved_labels(raw, tmp_path):
    task = task_from_dataset(raw, "clean", train_size=1000, clean_size=100, seed=0, data_seed=7)
    save_task_labels(task, tmp_path)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    assert manifest["task_info"]["train_subset"]["data_seed"] == 7
    assert manifest["task_info"]["train_subset"]["size"] == 1000
    saved = np.load(tmp_path / "labels" / "train_source_index.npy")
    assert set(saved.tolist()) == _ids(task.train)


def test_without_train_size_nothing_changes(raw):
    task = task_from_dataset(raw, "sym60", clean_size=100, seed=0)
    assert task.info["train_subset"] is None and len(task.train) == len(raw.train) - 100


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_size=0), "--train-size must be a positive whole number"),
        (dict(train_size=-5), "--train-size must be a positive whole number"),
        (dict(train_size=True), "--train-size must be a positive whole number"),
        (dict(train_size=12.5), "--train-size must be a positive whole number"),
        (dict(train_size=3001), "--train-size 3001 exceeds the 3000 training examples"),
        (dict(train_size=7), "--train-size 7 is smaller than the 10 classes"),
        (dict(train_size=2010), r"needs 201 examples of class 0 .* has 200; at most 2000"),
        (dict(train_size=1950, clean_size=100), r"trusted set needs 10 examples of class 0 .* outside the --train-size 1950 subset; the largest it can be here is 50 \(--clean-size 50 or --clean-frac 0.02564\), or lower --train-size"),
        (dict(train_size=1900, clean_size=50, val_size=1000), r"val split needs .* lower --val-size .*, or --train-size \(1900: the split is drawn from outside that subset\)"),
    ],
)
def test_bad_train_sizes_name_the_flag(raw, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task_from_dataset(raw, "clean", seed=0, **kwargs)


def test_cifar10n_cpu_subsets_the_cifar10n_files_and_takes_real_and_synthetic_noise(tmp_path, writers):
    arrays = writers.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=40)
    human = writers.write_cifar10n(tmp_path / "cifar-n" / "CIFAR-10_human.pt", arrays["train_y"])
    worst = build_task("cifar10n-cpu", data_dir=tmp_path, noise="worst", train_size=100, clean_size=20, val_size=20, seed=0, verify_checksums=False)
    index = worst.train.source_index.numpy()
    assert len(worst.train) == 100 and np.array_equal(worst.train.labels.numpy(), human["worse_label"][index])
    assert np.array_equal(worst.train.true_labels.numpy(), arrays["train_y"][index])
    asym = build_task("cifar10n-cpu", data_dir=tmp_path, noise="asym40", train_size=100, seed=0, verify_checksums=False)
    assert asym.info["noise_description"].startswith("asym40: truck->automobile")  # CIFAR-10's class map
    with pytest.raises(ValueError, match="noisy100"):
        build_task("cifar10n-cpu", data_dir=tmp_path, noise="noisy100", train_size=100, verify_checksums=False)
