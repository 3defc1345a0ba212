"""Tiny files in the official formats, loaded through the public API; bad files give one clear
DataError naming the file."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from nrcore.data import DATASETS, DataError, build_task, load_dataset

NO_CHECKSUMS = dict(verify_checksums=False)  # tiny files carry official names, not official content


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- MNIST family --------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["mnist", "MNIST/raw", "."])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_load_from_each_layout(tmp_path, writers, folder, gz):
    arrays = writers.write_mnist(tmp_path / folder, gz=gz)
    task = build_task("mnist", data_dir=tmp_path, **NO_CHECKSUMS)
    assert len(task.train) == 200 and len(task.test) == 100 and task.input_shape == (1, 28, 28)
    assert torch.equal(task.train.images[:, 0], torch.from_numpy(arrays["train_x"]))
    assert torch.equal(task.test.labels, torch.from_numpy(arrays["test_y"]))
    assert task.info["data_files"][0]["checksum"].startswith("not checked")


def test_fashion_mnist_layout_and_class_names(tmp_path, writers):
    writers.write_mnist(tmp_path / "FashionMNIST" / "raw")
    task = build_task("fashion-mnist", data_dir=tmp_path, **NO_CHECKSUMS)
    assert task.class_names[0] == "T-shirt/top" and task.mean == (0.2860,)


def test_mnist10k_splits_the_test_files_8_to_2(tmp_path, writers):
    arrays = writers.write_mnist(tmp_path / "mnist", n_test=10000, gz=False)
    task = build_task("mnist10k", data_dir=tmp_path, **NO_CHECKSUMS)
    assert len(task.train) == 8000 and len(task.test) == 2000
    assert np.bincount(task.test.labels.numpy()).tolist() == [200] * 10  # stratified
    source = np.concatenate([task.train.source_index.numpy(), task.test.source_index.numpy()])
    assert sorted(source.tolist()) == list(range(10000))
    assert np.array_equal(task.test.labels.numpy(), arrays["test_y"][task.test.source_index.numpy()])
    assert "8000 train / 2000 test" in task.info["split_rule"]


def test_mnist10k_needs_the_full_test_file(mnist_dir):
    data_dir, _ = mnist_dir
    with pytest.raises(DataError, match="10,000"):
        build_task("mnist10k", data_dir=data_dir, **NO_CHECKSUMS)


def test_checksums_of_official_files_are_verified(tmp_path, writers):
    writers.write_mnist(tmp_path / "mnist")
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=tmp_path)
    message = _one_line(err)
    assert "t10k-images-idx3-ubyte.gz" in message and "differs from the official" in message and "verify_checksums=False" in message


def test_missing_files_say_what_to_put_where(tmp_path):
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=tmp_path)
    message = _one_line(err)
    for layout in ("mnist", "MNIST/raw", str(tmp_path)):
        assert layout in message
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        assert f"{name}|{name}.gz" in message  # all four, not the first pair only
    assert "--download" in message


def test_mnist10k_needs_only_the_test_files(tmp_path):
    with pytest.raises(DataError) as err:
        build_task("mnist10k", data_dir=tmp_path)
    message = _one_line(err)
    assert "t10k-images-idx3-ubyte" in message and "train-images-idx3-ubyte|" not in message


def test_no_data_dir_points_to_the_flag_and_the_variable(monkeypatch):
    monkeypatch.delenv("NRCORE_DATA", raising=False)
    with pytest.raises(DataError) as err:
        build_task("cifar10")
    message = _one_line(err)
    assert "--data-dir" in message and "NRCORE_DATA" in message and "cifar-10-batches-py" in message


def test_nrcore_data_variable_is_the_default_folder(tmp_path, writers, monkeypatch):
    writers.write_mnist(tmp_path / "mnist")
    monkeypatch.setenv("NRCORE_DATA", str(tmp_path))
    assert len(build_task("mnist", **NO_CHECKSUMS).train) == 200


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="mnist10k"):
        build_task("imagenet")
    assert set(DATASETS) >= {"mnist", "mnist10k", "fashion-mnist", "digits", "cifar10", "cifar100", "cifar10n", "cifar100n", "clothing1m", "custom"}


# ---- bad idx files -----------------------------------------------------------------------------------
def test_truncated_idx_is_a_clear_error(mnist_dir):
    data_dir, _ = mnist_dir
    path = data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=data_dir, **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "truncated" in str(err.value)


def test_truncated_gzip_is_a_clear_error(mnist_dir):
    data_dir, _ = mnist_dir
    path = data_dir / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=data_dir, **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "gzip" in str(err.value)


def test_wrong_magic_number_is_a_clear_error(mnist_dir, writers):
    data_dir, arrays = mnist_dir
    path = data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    writers.write_idx(path, arrays["test_y"])  # a label file under an image file's name
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=data_dir, **NO_CHECKSUMS)
    message = _one_line(err)
    assert str(path) in message and "magic number 0x00000801" in message and "0x00000803" in message


def test_label_file_of_the_wrong_length_is_a_clear_error(mnist_dir, writers):
    data_dir, arrays = mnist_dir
    path = data_dir / "mnist" / "train-labels-idx1-ubyte.gz"
    writers.write_idx(path, arrays["train_y"][:150])
    with pytest.raises(DataError) as err:
        build_task("mnist", data_dir=data_dir, **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "150 labels" in str(err.value) and "200 images" in str(err.value)


# ---- CIFAR pickles -----------------------------------------------------------------------------------
def test_cifar10_pickles_load_in_official_order(tmp_path, writers):
    arrays = writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    task = build_task("cifar10", data_dir=tmp_path, **NO_CHECKSUMS)
    assert len(task.train) == 100 and len(task.test) == 20 and task.input_shape == (3, 32, 32)
    assert torch.equal(task.train.images, torch.from_numpy(arrays["train_x"]))
    assert torch.equal(task.train.labels, torch.from_numpy(arrays["train_y"]))
    assert task.class_names[9] == "truck" and "random crop 32" in task.info["augmentation"]
    assert task.info["format"].startswith("official python pickles")


def test_cifar10_npz_loads_and_takes_class_names_from_batches_meta(tmp_path, writers):
    arrays = writers.write_cifar10_npz(tmp_path / "cifar10" / "cifar10.npz")
    (tmp_path / "cifar10" / "batches.meta").write_bytes(writers.python2_style_pickle({"label_names": [f"c{i}".encode() for i in range(10)]}))
    task = build_task("cifar10", data_dir=tmp_path, **NO_CHECKSUMS)
    assert torch.equal(task.train.images, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert task.class_names[0] == "c0"
    assert task.info["data_files"][0]["checksum"] == "no official checksum"
    assert task.info["checksums_verified"] is False


def test_cifar10_missing_lists_pickle_and_npz_layouts(tmp_path):
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path)
    message = _one_line(err)
    assert "cifar-10-batches-py" in message and "cifar10.npz" in message


def test_cifar100_pickles_give_fine_labels_and_real_super_classes(tmp_path, writers):
    arrays = writers.write_cifar100(tmp_path / "cifar-100-python")
    task = build_task("cifar100", data_dir=tmp_path, noise="asym100", seed=0, **NO_CHECKSUMS)
    assert task.num_classes == 100 and torch.equal(task.train.true_labels, torch.from_numpy(arrays["train_y"]))
    raw = load_dataset("cifar100", tmp_path, **NO_CHECKSUMS)
    assert np.array_equal(raw.coarse_of_class, writers.coarse_of_fine)
    coarse = writers.coarse_of_fine
    for true, noisy in zip(task.train.true_labels.tolist(), task.train.labels.tolist()):
        members = np.flatnonzero(coarse == coarse[true])
        assert noisy == members[(list(members).index(true) + 1) % len(members)]


def test_truncated_cifar_pickle_is_a_clear_error(tmp_path, writers):
    writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path, **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "truncated or corrupt" in str(err.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_importing_anything_else_is_refused_without_running_it(tmp_path, writers):
    writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": [0]}, protocol=2))
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path, **NO_CHECKSUMS)
    message = _one_line(err)
    assert str(path) in message and "system" in message and "refusing" in message
    assert not marker.exists()


def test_cifar_batch_with_the_wrong_label_count_is_a_clear_error(tmp_path, writers):
    writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(writers.python2_style_pickle({"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 19}))
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path, **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "expected 20" in str(err.value)


def test_bad_npz_is_a_clear_error(tmp_path, writers):
    path = tmp_path / "cifar10" / "cifar10.npz"
    writers.write_cifar10_npz(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path)
    assert str(path) in _one_line(err)
    np.savez(path, x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(3, np.int64), x_test=np.zeros((1, 32, 32, 3), np.uint8), y_test=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="y_train has 3 entries"):
        build_task("cifar10", data_dir=tmp_path)


# ---- CIFAR-N ---------------------------------------------------------------------------------------
@pytest.fixture
def cifar10n_dir(tmp_path, writers):
    arrays = writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    labels = writers.write_cifar10n(tmp_path / "cifar-n" / "CIFAR-10_human.pt", arrays["train_y"])
    return tmp_path, labels


@pytest.mark.parametrize("spec, key", [("aggre", "aggre_label"), ("random1", "random_label1"), ("random2", "random_label2"), ("random3", "random_label3"), ("worst", "worse_label")])
def test_cifar10n_real_label_sets(cifar10n_dir, spec, key):
    data_dir, labels = cifar10n_dir
    task = build_task("cifar10n", data_dir=data_dir, noise=spec, **NO_CHECKSUMS)
    assert torch.equal(task.train.labels, torch.from_numpy(labels[key]))
    assert task.noise_rate_realized == pytest.approx((labels[key] != labels["clean_label"]).mean())
    assert task.noise_rate_nominal is None and task.transition_matrix.shape == (10, 10)


def test_cifar10n_trusted_set_comes_from_the_clean_labels(cifar10n_dir):
    data_dir, labels = cifar10n_dir
    task = build_task("cifar10n", data_dir=data_dir, noise="worst", clean_size=20, seed=1, **NO_CHECKSUMS)
    index = task.clean.source_index.numpy()
    assert np.array_equal(task.clean.labels.numpy(), labels["clean_label"][index])
    assert not set(index.tolist()) & set(task.train.source_index.tolist())


def test_cifar_n_and_synthetic_noise_do_not_mix(cifar10n_dir):
    data_dir, _ = cifar10n_dir
    with pytest.raises(ValueError, match="use --dataset cifar10"):
        build_task("cifar10n", data_dir=data_dir, noise="sym20")
    with pytest.raises(ValueError, match="cifar10n"):
        build_task("cifar10", data_dir=data_dir, noise="aggre")


def test_cifar10n_labels_out_of_order_are_refused(tmp_path, writers):
    arrays = writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-n" / "CIFAR-10_human.pt"
    writers.write_cifar10n(path, arrays["train_y"][::-1].copy())
    with pytest.raises(DataError) as err:
        build_task("cifar10n", data_dir=tmp_path, noise="aggre", **NO_CHECKSUMS)
    assert str(path) in _one_line(err) and "not in the same order" in str(err.value)


def test_cifar_n_file_importing_anything_else_is_refused(tmp_path, writers):
    arrays = writers.write_cifar10(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-n" / "CIFAR-10_human.pt"
    path.parent.mkdir()
    torch.save({"clean_label": arrays["train_y"], "aggre_label": _Exploit(marker)}, path)
    with pytest.raises(DataError) as err:
        build_task("cifar10n", data_dir=tmp_path, noise="aggre", **NO_CHECKSUMS)
    message = _one_line(err)
    assert str(path) in message and "system" in message and "refusing" in message
    assert not marker.exists()


def test_truncated_cifar_n_file_is_a_clear_error(cifar10n_dir):
    data_dir, _ = cifar10n_dir
    path = data_dir / "cifar-n" / "CIFAR-10_human.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as err:
        build_task("cifar10n", data_dir=data_dir, noise="aggre", **NO_CHECKSUMS)
    assert str(path) in _one_line(err)


def test_cifar100n_noisy_labels(tmp_path, writers):
    arrays = writers.write_cifar100(tmp_path / "cifar-100-python")
    labels = writers.write_cifar100n(tmp_path / "cifar-n" / "CIFAR-100_human.pt", arrays["train_y"])
    task = build_task("cifar100n", data_dir=tmp_path, noise="noisy100", clean_size=100, seed=0, **NO_CHECKSUMS)
    index = task.train.source_index.numpy()
    assert np.array_equal(task.train.labels.numpy(), labels["noisy_label"][index])
    assert task.noise_rate_realized == pytest.approx((labels["noisy_label"][index] != arrays["train_y"][index]).mean())


def test_cifar100n_without_images_names_the_missing_images(tmp_path, writers):
    writers.write_cifar100n(tmp_path / "cifar-n" / "CIFAR-100_human.pt", np.arange(50) % 100)
    with pytest.raises(DataError) as err:
        build_task("cifar100n", data_dir=tmp_path, noise="noisy100")
    assert "cifar-100-python" in _one_line(err)


# ---- Clothing1M ------------------------------------------------------------------------------------
@pytest.mark.parametrize("annotations_subfolder", [False, True])
def test_clothing1m_lists_load_lazily_and_stay_disjoint(tmp_path, writers, annotations_subfolder):
    released = writers.write_clothing1m(tmp_path / "clothing1m", annotations_subfolder=annotations_subfolder)
    task = build_task("clothing1m", data_dir=tmp_path, noise="real", clean_size=14, val_size=14, seed=0)
    keys = released["keys"]
    assert task.train.images is None and task.input_shape == (3, 224, 224)
    train_keys, clean_keys, val_keys = set(task.train.source.keys), set(task.clean.source.keys), set(task.val.source.keys)
    assert clean_keys <= set(keys["clean_train"]) and val_keys <= set(keys["clean_val"])
    assert not train_keys & clean_keys and not train_keys & val_keys
    assert train_keys <= set(keys["noisy_train"]) and task.test.source.keys == keys["clean_test"]
    assert not train_keys & set(keys["clean_test"]) and task.info["test_keys_removed_from_training"] == 1
    assert task.train.labels.tolist() == [released["noisy_kv"][k] for k in task.train.source.keys]
    truth = task.train.true_labels.numpy()
    assert (truth == -1).any() and (truth >= 0).any()  # only part of the noisy set has clean labels
    assert task.info["noise_rate_realized_over"] == int((truth >= 0).sum())


def test_clothing1m_takes_only_its_own_labels(tmp_path, writers):
    writers.write_clothing1m(tmp_path / "clothing1m")
    with pytest.raises(ValueError, match="real"):
        build_task("clothing1m", data_dir=tmp_path, noise="sym20")


def test_clothing1m_missing_images_is_a_clear_error(tmp_path, writers):
    released = writers.write_clothing1m(tmp_path / "clothing1m")
    (tmp_path / "clothing1m" / released["keys"]["clean_test"][0]).unlink()
    with pytest.raises(DataError) as err:
        build_task("clothing1m", data_dir=tmp_path, noise="real")
    assert "image not found" in _one_line(err)


# ---- custom ----------------------------------------------------------------------------------------
def _custom_npz(path, writers, **extra):
    x, y = writers.tiny_images(60, (8, 8), 1), writers.balanced_labels(60, 3, 2)
    np.savez(path, x=x, y=y, x_test=writers.tiny_images(9, (8, 8), 3), y_test=np.arange(9) % 3, **extra)
    return x, y


def test_custom_npz_with_noisy_labels_true_labels_and_trusted_rows(tmp_path, writers):
    rng = np.random.default_rng(0)
    y_true = writers.balanced_labels(60, 3, 2)
    y = np.where(rng.random(60) < 0.3, (y_true + 1) % 3, y_true)
    trusted = np.flatnonzero(y == y_true)[:9]
    np.savez(tmp_path / "data.npz", x=writers.tiny_images(60, (8, 8), 1), y=y, y_true=y_true, trusted=trusted,
             x_test=writers.tiny_images(9, (8, 8), 3), y_test=np.arange(9) % 3)  # fmt: skip
    task = build_task("custom", data_dir=tmp_path, noise="real")
    assert task.num_classes == 3 and task.input_shape == (1, 8, 8)
    assert sorted(task.clean.source_index.tolist()) == sorted(trusted.tolist())
    assert task.info["clean_rule"] == "marked in the custom data file"
    index = task.train.source_index.numpy()
    assert task.noise_rate_realized == pytest.approx((y[index] != y_true[index]).mean())
    with pytest.raises(ValueError, match="marks its trusted examples"):
        build_task("custom", data_dir=tmp_path / "data.npz", noise="real", clean_size=3)


def test_custom_clean_labels_take_synthetic_noise(tmp_path, writers):
    _, y = _custom_npz(tmp_path / "mine.npz", writers)
    task = build_task("custom", data_dir=tmp_path / "mine.npz", noise="sym50", clean_size=6, seed=0)
    assert task.noise_rate_realized > 0 and len(task.clean) == 6
    assert np.array_equal(task.train.true_labels.numpy(), y[task.train.source_index.numpy()])


def test_custom_noisy_labels_without_truth_cannot_give_a_trusted_set(tmp_path, writers):
    _custom_npz(tmp_path / "mine.npz", writers)
    task = build_task("custom", data_dir=tmp_path / "mine.npz", noise="real")
    assert task.info["noise_rate_realized"] is None
    with pytest.raises(DataError, match="known clean label"):
        build_task("custom", data_dir=tmp_path / "mine.npz", noise="real", clean_size=6)


def test_custom_csv_of_image_files(tmp_path, writers):
    rows = ["path,label,trusted"]
    for i in range(12):
        writers.write_png(tmp_path / "img" / f"{i}.png", (6, 5), seed=i)
        rows.append(f"img/{i}.png,{i % 2},{int(i < 4)}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.csv").write_text("path,label\nimg/0.png,0\nimg/1.png,1\n")
    task = build_task("custom", data_dir=tmp_path, noise="real")
    assert task.input_shape == (3, 5, 6) and len(task.clean) == 4 and len(task.train) == 8 and len(task.test) == 2
    batch = next(iter(task.loader("train", 4)))
    assert batch.x.shape == (4, 3, 5, 6)


def test_custom_csv_with_mismatched_sizes_names_the_image(tmp_path, writers):
    writers.write_png(tmp_path / "a.png", (6, 5), seed=0)
    writers.write_png(tmp_path / "b.png", (7, 5), seed=1)
    (tmp_path / "train.csv").write_text("path,label\na.png,0\nb.png,1\n")
    (tmp_path / "test.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(DataError) as err:
        build_task("custom", data_dir=tmp_path)
    assert "b.png" in _one_line(err)


def test_custom_without_files_says_which_files(tmp_path):
    with pytest.raises(DataError) as err:
        build_task("custom", data_dir=tmp_path)
    message = _one_line(err)
    assert "data.npz" in message and "train.csv" in message
