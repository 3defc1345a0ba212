"""The real files in ../shared/data (and Debian's Fashion-MNIST): known sizes, label counts,
checksums, channel means and CIFAR-N noise rates. Skipped where the files are absent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from nrcore.data import DataError, NoiseSpec, build_task, load_dataset
from nrcore.data.formats import read_cifar_n
from nrcore.data.task import task_from_dataset

pytestmark = pytest.mark.realdata

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
FASHION_MNIST = Path("/usr/share/datasets")


def test_mnist_sizes_label_counts_and_checksums(shared_data):
    task = build_task("mnist", data_dir=shared_data)
    assert len(task.train) == 60000 and len(task.test) == 10000
    assert np.bincount(task.train.labels.numpy()).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(task.test.labels.numpy()).tolist() == MNIST_TEST_COUNTS
    assert task.info["checksums_verified"] is True and len(task.info["data_files"]) == 4


def test_mnist10k_is_a_fixed_stratified_8000_2000_split(shared_data):
    task = build_task("mnist10k", data_dir=shared_data, noise="sym50", clean_size=1000, val_size=500, seed=11)
    assert len(task.test) == 2000 and len(task.train) + len(task.clean) + len(task.val) == 8000
    test_counts = np.bincount(task.test.labels.numpy())
    assert np.abs(test_counts - 0.2 * np.array(MNIST_TEST_COUNTS)).max() <= 1
    # the benchmark's test split must never change between versions or seeds
    digest = hashlib.md5(np.sort(task.test.source_index.numpy()).astype("<i8").tobytes()).hexdigest()
    assert digest == "57d47dc40361773cc0441ccad45f06c8"
    assert (np.bincount(task.clean.labels.numpy()) == 100).all()
    assert abs(task.noise_rate_realized - 0.5) < 0.03


@pytest.fixture(scope="module")
def cifar10(shared_data):
    return load_dataset("cifar10", shared_data)


def test_cifar10_npz_sizes_counts_and_channel_means(cifar10):
    assert len(cifar10.train) == 50000 and len(cifar10.test) == 10000
    assert (np.bincount(cifar10.train.labels) == 5000).all() and (np.bincount(cifar10.test.labels) == 1000).all()
    means = [(cifar10.train.images[:, c].double() / 255).mean().item() for c in range(3)]
    assert means == pytest.approx([0.4914, 0.4822, 0.4465], abs=5e-5)
    assert cifar10.class_names[:2] == ["airplane", "automobile"]
    status = {Path(f.path).name: f.checksum for f in cifar10.files}
    assert status == {"cifar10.npz": "no official checksum", "batches.meta": "verified"}


@pytest.fixture(scope="module")
def cifar10n(shared_data):
    return load_dataset("cifar10n", shared_data)


@pytest.mark.parametrize("spec, rate", [("aggre", 0.0901), ("worst", 0.4021), ("random1", 0.1723), ("random2", 0.1812), ("random3", 0.1764)])
def test_cifar10n_real_noise_rates(cifar10n, spec, rate):
    task = task_from_dataset(cifar10n, spec)
    assert len(task.train) == 50000 and task.noise_rate_realized == pytest.approx(rate, abs=5e-5)


def test_cifar10n_trusted_set_and_file_record(cifar10n):
    task = task_from_dataset(cifar10n, "worst", clean_size=2000, seed=0)
    assert len(task.train) == 48000 and (np.bincount(task.clean.labels.numpy()) == 200).all()
    assert not set(task.clean.source_index.tolist()) & set(task.train.source_index.tolist())
    assert Path(task.info["data_files"][-1]["path"]).name == "CIFAR-10_human.pt"


def test_cifar10_asym_on_the_real_labels(cifar10):
    task = task_from_dataset(cifar10, "asym40", clean_size=1000, seed=0)
    assert task.info["noise_rate_expected"] == pytest.approx(0.4 * 0.5, abs=1e-3)  # half the classes flip
    assert abs(task.noise_rate_realized - task.info["noise_rate_expected"]) < 0.01
    assert (np.bincount(task.clean.labels.numpy()) == 100).all()


def test_cifar100n_label_file_and_real_super_classes(shared_data):
    path = shared_data / "cifar-n" / "CIFAR-100_human.pt"
    arrays, _ = read_cifar_n(path, ("clean_label", "noisy_label", "clean_coarse_label"))
    assert (arrays["clean_label"] != arrays["noisy_label"]).mean() == pytest.approx(0.4020, abs=5e-5)
    # the super-class of each fine class, from the real coarse labels shipped in the same file
    coarse = arrays["clean_coarse_label"]
    coarse_of_class = np.array([np.unique(coarse[arrays["clean_label"] == c]).item() for c in range(100)])
    assert (np.bincount(coarse_of_class) == 5).all()
    T = NoiseSpec.parse("asym100").transition_matrix(100, dataset="cifar100", coarse_of_class=coarse_of_class)
    targets = T.argmax(1).numpy()
    assert (coarse_of_class[targets] == coarse_of_class).all() and (targets != np.arange(100)).all()


def test_cifar100n_needs_the_cifar100_images(shared_data):
    with pytest.raises(DataError, match="cifar-100-python"):
        build_task("cifar100n", data_dir=shared_data, noise="noisy100")


def test_fashion_mnist_from_the_debian_package():
    if not (FASHION_MNIST / "fashion-mnist").is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    task = build_task("fashion-mnist", data_dir=FASHION_MNIST, noise="pair45", seed=0)
    assert len(task.train) == 60000 and len(task.test) == 10000
    assert (np.bincount(task.test.labels.numpy()) == 1000).all()
    assert task.info["checksums_verified"] is True
    pixels = task.train.images.double() / 255
    assert pixels.mean().item() == pytest.approx(task.mean[0], abs=1e-3)
