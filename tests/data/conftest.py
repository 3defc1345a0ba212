"""Fixtures for the data-layer tests: writers of tiny files in the official formats (idx, CIFAR
pickles, CIFAR-N label dicts, Clothing1M lists, custom npz/CSV) and the real-data folder."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nrcore.data.datasets import Pool, RawDataset


# ---- real data -------------------------------------------------------------------------------
def _shared_data() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("NRCORE_SHARED_DATA", default))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $NRCORE_SHARED_DATA); skips the test when absent."""
    path = _shared_data()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} absent")
    return path


# ---- writers of the official formats ---------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, *, gz: bool = None) -> Path:
    """An idx file of unsigned bytes (gzipped when the name ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def tiny_images(n: int, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n,) + tuple(shape), dtype=np.uint8)


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.int64)


def write_mnist(folder: Path, n_train: int = 200, n_test: int = 100, gz: bool = True) -> dict:
    """The four MNIST idx files in `folder`; returns the arrays written."""
    suffix = ".gz" if gz else ""
    arrays = {
        "train_x": tiny_images(n_train, (28, 28), 1), "train_y": balanced_labels(n_train, 10, 2),
        "test_x": tiny_images(n_test, (28, 28), 3), "test_y": balanced_labels(n_test, 10, 4),
    }  # fmt: skip
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", arrays["train_x"])
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", arrays["train_y"])
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", arrays["test_x"])
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", arrays["test_y"])
    return arrays


def python2_style_pickle(obj) -> bytes:
    """Protocol 2, naming numpy's array reconstructor as numpy 1.x (and the official files) do."""
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar10(folder: Path, per_batch: int = 20, n_test: int = 20) -> dict:
    """cifar-10-batches-py/ with five tiny training batches, test_batch and batches.meta."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = tiny_images(per_batch, (3072,), 10 + i), balanced_labels(per_batch, 10, 20 + i)
        batch = {"batch_label": f"training batch {i} of 5", "labels": y.tolist(), "data": x, "filenames": [b"f.png"] * per_batch}
        (folder / f"data_batch_{i}").write_bytes(python2_style_pickle(batch))
        xs.append(x)
        ys.append(y)
    tx, ty = tiny_images(n_test, (3072,), 30), balanced_labels(n_test, 10, 31)
    (folder / "test_batch").write_bytes(python2_style_pickle({"batch_label": "testing batch 1 of 1", "labels": ty.tolist(), "data": tx}))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(python2_style_pickle({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}))
    return {"train_x": np.concatenate(xs).reshape(-1, 3, 32, 32), "train_y": np.concatenate(ys), "test_x": tx.reshape(-1, 3, 32, 32), "test_y": ty}


# A CIFAR-100-like class structure for tiny files: fine class f is in super-class COARSE_OF_FINE[f].
COARSE_OF_FINE = np.random.default_rng(7).permutation(np.arange(100) % 20)


def write_cifar100(folder: Path, n_train: int = 400, n_test: int = 100) -> dict:
    """cifar-100-python/{train,test,meta} with fine and coarse labels."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, seed in (("train", n_train, 40), ("test", n_test, 41)):
        x, fine = tiny_images(n, (3072,), seed), balanced_labels(n, 100, seed + 1)
        entry = {"filenames": [b"f.png"] * n, "batch_label": split, "fine_labels": fine.tolist(),
                 "coarse_labels": COARSE_OF_FINE[fine].tolist(), "data": x}  # fmt: skip
        (folder / split).write_bytes(python2_style_pickle(entry))
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x.reshape(-1, 3, 32, 32), fine
    meta = {"fine_label_names": [f"fine{i}".encode() for i in range(100)], "coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(python2_style_pickle(meta))
    return arrays


def write_cifar10_npz(path: Path, n_train: int = 100, n_test: int = 20) -> dict:
    arrays = {
        "x_train": tiny_images(n_train, (32, 32, 3), 50), "y_train": balanced_labels(n_train, 10, 51),
        "x_test": tiny_images(n_test, (32, 32, 3), 52), "y_test": balanced_labels(n_test, 10, 53),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def noisy_copy(labels: np.ndarray, num_classes: int, rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < rate
    return np.where(flip, (labels + rng.integers(1, num_classes, len(labels))) % num_classes, labels).astype(np.int64)


def write_cifar10n(path: Path, clean: np.ndarray) -> dict:
    """A CIFAR-10N label dict saved with torch.save, as released."""
    labels = {"clean_label": clean.astype(np.int64)}
    for i, (key, rate) in enumerate((("aggre_label", 0.1), ("worse_label", 0.4), ("random_label1", 0.17),
                                     ("random_label2", 0.18), ("random_label3", 0.18))):  # fmt: skip
        labels[key] = noisy_copy(clean, 10, rate, 60 + i)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(labels, path)
    return labels


def write_cifar100n(path: Path, clean: np.ndarray) -> dict:
    labels = {"clean_label": clean.astype(np.int64), "noisy_label": noisy_copy(clean, 100, 0.4, 70)}
    saved = dict(labels, clean_coarse_label=COARSE_OF_FINE[clean].tolist(), noisy_coarse_label=COARSE_OF_FINE[labels["noisy_label"]].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return labels


def write_png(path: Path, size, seed: int, mode: str = "RGB") -> Path:
    from PIL import Image

    channels = 3 if mode == "RGB" else 1
    pixels = tiny_images(1, (size[1], size[0], channels), seed)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)
    return path


def write_clothing1m(root: Path, *, annotations_subfolder: bool = False) -> dict:
    """A tiny Clothing1M release: images/ plus the six annotation lists. The noisy list shares
    two keys with clean_train, one with clean_val and one with clean_test."""
    C = 14
    keys = {
        "noisy_train": [f"images/0/{i:02d}/n{i}.jpg" for i in range(42)],
        "clean_train": [f"images/1/{i:02d}/c{i}.jpg" for i in range(28)],
        "clean_val": [f"images/2/{i:02d}/v{i}.jpg" for i in range(28)],
        "clean_test": [f"images/3/{i:02d}/t{i}.jpg" for i in range(14)],
    }
    keys["noisy_train"] += [keys["clean_train"][0], keys["clean_train"][1], keys["clean_val"][0], keys["clean_test"][0]]
    clean_kv = {k: i % C for lst in ("clean_train", "clean_val", "clean_test") for i, k in enumerate(keys[lst])}
    for i, k in enumerate(keys["noisy_train"][:20]):  # some noisy-list images also have clean labels
        clean_kv.setdefault(k, i % C)
    noisy_kv = {k: (clean_kv.get(k, i) + (i % 3 == 0)) % C for i, k in enumerate(keys["noisy_train"])}
    annotations = root / "annotations" if annotations_subfolder else root
    annotations.mkdir(parents=True, exist_ok=True)
    for name, table in (("noisy_label_kv.txt", noisy_kv), ("clean_label_kv.txt", clean_kv)):
        (annotations / name).write_text("".join(f"{k} {v}\n" for k, v in table.items()))
    for name, lst in keys.items():
        (annotations / f"{name}_key_list.txt").write_text("\n".join(lst) + "\n")
    for i, key in enumerate(dict.fromkeys(k for lst in keys.values() for k in lst)):
        write_png(root / key, (20 + i % 7, 16 + i % 5), seed=100 + i)
    return {"keys": keys, "clean_kv": clean_kv, "noisy_kv": noisy_kv}


# ---- in-memory datasets ------------------------------------------------------------------------------
def synthetic_raw(labels: np.ndarray, num_classes: int, name: str = "synthetic", n_test: int = 10) -> RawDataset:
    """A RawDataset with 1x2x2 images (image i holds the value i % 256) and the given labels."""
    n = len(labels)
    images = torch.from_numpy((np.arange(n) % 256).astype(np.uint8)).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    test_labels = np.arange(n_test, dtype=np.int64) % num_classes
    return RawDataset(
        name, num_classes, (1, 2, 2), [str(c) for c in range(num_classes)], (0.5,), (0.25,), None,
        Pool(np.asarray(labels, dtype=np.int64), np.arange(n, dtype=np.int64), images=images),
        Pool(test_labels, np.arange(n_test, dtype=np.int64), images=torch.zeros(n_test, 1, 2, 2, dtype=torch.uint8)),
    )  # fmt: skip


@pytest.fixture
def mnist_dir(tmp_path) -> tuple:
    """(data_dir, arrays) with tiny MNIST files in data_dir/mnist/."""
    arrays = write_mnist(tmp_path / "mnist")
    return tmp_path, arrays


@pytest.fixture
def writers():
    """The writers above, for test modules (conftest is not importable under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        write_idx=write_idx, write_mnist=write_mnist, write_cifar10=write_cifar10, write_cifar100=write_cifar100,
        write_cifar10_npz=write_cifar10_npz, write_cifar10n=write_cifar10n, write_cifar100n=write_cifar100n,
        write_clothing1m=write_clothing1m, write_png=write_png, python2_style_pickle=python2_style_pickle,
        synthetic_raw=synthetic_raw, tiny_images=tiny_images, balanced_labels=balanced_labels,
        coarse_of_fine=COARSE_OF_FINE,
    )  # fmt: skip
