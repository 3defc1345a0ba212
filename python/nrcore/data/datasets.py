"""Datasets in their official formats: where their files may lie and how they load.

`load_dataset(name, data_dir)` returns a `RawDataset`: the original training examples (the pool
the trusted, validation and noisy training sets are drawn from) and the test split, with their
original labels, plus everything a run must report about the files it read. Noise and splits
are applied by `nrcore.data.task.build_task`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nrcore.data import formats
from nrcore.data.errors import DataError
from nrcore.data.images import ImageFiles, decode_image, image_mode
from nrcore.data.noise import REAL_LABEL_SPECS
from nrcore.data.splits import seeded_generator, stratified_holdout
from nrcore.data.types import Augmentation

DATASETS = (
    "mnist", "mnist10k", "fashion-mnist", "digits", "cifar10", "cifar100", "cifar10n", "cifar10n-cpu", "cifar100n", "clothing1m", "custom",
)  # fmt: skip

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CLOTHING1M_CLASSES = [
    "T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
    "Jacket", "Down Coat", "Suit", "Shawl", "Dress", "Vest", "Underwear",
]  # fmt: skip

# Per-channel mean/std of pixel values in [0, 1] over the training images (CIFAR-10 measured
# on the real 50,000; MNIST, Fashion-MNIST and CIFAR-100: the standard published values;
# digits: measured on the 1,437 training images; Clothing1M: ImageNet's, as its models start
# from ImageNet weights).
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3051,), (0.3758,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "clothing1m": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
CIFAR_AUGMENTATION = Augmentation(pad=4, crop=32, flip=True)
CLOTHING1M_AUGMENTATION = Augmentation(pad=0, crop=224, flip=True)
CLOTHING1M_STORED_SIZE = 256

MNIST10K_SOURCE_SIZE = 10000
MNIST10K_TEST_SIZE = 2000
DIGITS_TEST_SIZE = 360
FIXED_SPLIT_SEED = 0  # mnist10k and digits: the same train/test split for every run seed


@dataclass
class FileRecord:
    """One file a dataset was read from; `checksum` is one of the formats.* status strings."""

    path: str
    md5: str
    checksum: str

    def as_dict(self) -> dict:
        return {"path": self.path, "md5": self.md5, "checksum": self.checksum}


@dataclass
class Pool:
    """The examples of one original split, in their original order.

    labels:        original labels, -1 where unknown (Clothing1M noisy set, custom without y_true)
    source_index:  index of each example in the dataset's original file/list (audit trail)
    images:        uint8 [N, C, H, W], or None when streamed from `source`
    """

    labels: np.ndarray
    source_index: np.ndarray
    images: Optional[torch.Tensor] = None
    source: Optional[ImageFiles] = None

    def __len__(self) -> int:
        return len(self.labels)

    def select_inputs(self, indices: np.ndarray) -> Tuple[Optional[torch.Tensor], Optional[ImageFiles]]:
        if self.images is not None:
            return self.images[torch.from_numpy(indices)], None
        return None, self.source.subset(indices)


@dataclass
class RawDataset:
    """A dataset as its files hold it, before noise and splits.

    train:              the original training examples (the pool for trusted/val/noisy sets)
    test:               the test split
    label_sets:         real noisy labels over `train`, by noise-spec name (CIFAR-N: "aggre",
                        "random1".. "worst", "noisy100"; Clothing1M and custom: "real")
    user_labels:        custom data: the labels in the file; the noisy labels under noise "real",
                        the original labels under any other noise spec
    trusted_candidates, val_candidates, noisy_candidates:
                        bool masks over `train` restricting which examples may go where
                        (Clothing1M's released lists); None: any
    fixed_trusted:      indices of `train` that form the trusted set (custom data marking them)
    coarse_of_class:    CIFAR-100: the super-class of each fine class (real coarse labels)
    notes:              dataset facts for the run summary (split rules, provenance)
    """

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augmentation: Optional[Augmentation]
    train: Pool
    test: Pool
    files: List[FileRecord] = field(default_factory=list)
    label_sets: Dict[str, np.ndarray] = field(default_factory=dict)
    user_labels: Optional[np.ndarray] = None
    trusted_candidates: Optional[np.ndarray] = None
    val_candidates: Optional[np.ndarray] = None
    noisy_candidates: Optional[np.ndarray] = None
    fixed_trusted: Optional[np.ndarray] = None
    coarse_of_class: Optional[np.ndarray] = None
    notes: Dict[str, object] = field(default_factory=dict)


class MissingDataError(DataError):
    """The files of a dataset are not where we looked (download=True may fetch them)."""


# ---- locating files ---------------------------------------------------------------------------
def resolve_data_dir(data_dir, dataset: str, create: bool = False) -> Path:
    """`data_dir`, else $NRCORE_DATA (made when `create`); an error that says where to put
    which files otherwise."""
    if data_dir is None:
        data_dir = os.environ.get("NRCORE_DATA") or None
    if data_dir is None:
        raise MissingDataError(
            f"{dataset}: no data folder given: pass --data-dir DIR (or set NRCORE_DATA); {LAYOUT_HINTS[dataset]}"
        )
    path = Path(data_dir).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        raise MissingDataError(f"{dataset}: data folder {path} does not exist; {LAYOUT_HINTS[dataset]}")
    return path


def _idx_names(prefix: str) -> List[Tuple[str, str]]:
    return [(f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"), (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz")]


def find_layout(data_dir: Path, dataset: str, folders: Sequence[str], names: Sequence[Tuple[str, ...]]) -> List[Path]:
    """The first folder under data_dir that holds every file in `names` (each a tuple of
    alternative file names, first preferred). A MissingDataError lists what was tried."""
    for folder in folders:
        base = data_dir / folder
        found = []
        for alternatives in names:
            hit = next((base / n for n in alternatives if (base / n).is_file()), None)
            if hit is None:
                break
            found.append(hit)
        else:
            return found
    raise MissingDataError(f"{dataset}: {describe_layout(data_dir, folders, names)}")


def describe_layout(data_dir: Path, folders: Sequence[str], names: Sequence[Tuple[str, ...]]) -> str:
    wanted = ", ".join("|".join(alts) for alts in names)
    return f"need {wanted} in one of: {', '.join(str(data_dir / f) for f in folders)}"


LAYOUT_HINTS = {
    "mnist": "put the four MNIST idx files (train-images-idx3-ubyte.gz, ...; gzipped or not) in DIR/mnist/, DIR/MNIST/raw/ or DIR/",
    "mnist10k": "put the MNIST test idx files (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in DIR/mnist/, DIR/MNIST/raw/ or DIR/",
    "fashion-mnist": "put the four Fashion-MNIST idx files in DIR/fashion-mnist/, DIR/FashionMNIST/raw/ or DIR/ "
    "(Debian/Ubuntu: apt-get install dataset-fashion-mnist, then use DIR=/usr/share/datasets)",
    "digits": "digits needs no files (scikit-learn ships them)",
    "cifar10": "extract cifar-10-python.tar.gz into DIR (DIR/cifar-10-batches-py/) or put cifar10.npz in DIR/cifar10/",
    "cifar100": "extract cifar-100-python.tar.gz into DIR (DIR/cifar-100-python/)",
    "cifar10n": "cifar10n needs the CIFAR-10 images (DIR/cifar-10-batches-py/ or DIR/cifar10/cifar10.npz) and "
    "CIFAR-10_human.pt (github.com/UCSC-REAL/cifar-10-100n) in DIR/cifar-n/",
    "cifar10n-cpu": "cifar10n-cpu (the CPU protocol of CIFAR-10 with CIFAR-10N labels) needs the cifar10n files: the CIFAR-10 images "
    "(DIR/cifar-10-batches-py/ or DIR/cifar10/cifar10.npz) and CIFAR-10_human.pt in DIR/cifar-n/",
    "cifar100n": "cifar100n needs the CIFAR-100 images (extract cifar-100-python.tar.gz into DIR) and "
    "CIFAR-100_human.pt (github.com/UCSC-REAL/cifar-10-100n) in DIR/cifar-n/",
    "clothing1m": "put the Clothing1M release (images/ and the *_key_list.txt, *_label_kv.txt files) in DIR/clothing1m/",
    "custom": "pass the .npz file, or a folder holding data.npz or train.csv and test.csv, as --data-dir",
}


# ---- MNIST family -----------------------------------------------------------------------------
IDX_FOLDERS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST", "."),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST", "."),
}


def _read_idx_pair(family: str, dataset: str, data_dir: Path, prefix: str, verify: bool, files: List[FileRecord]) -> Tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = find_layout(data_dir, dataset, IDX_FOLDERS[family], _idx_names(prefix))
    arrays = []
    for path, ndim in ((images_path, 3), (labels_path, 1)):
        array, content_md5 = formats.read_idx(path, ndim)
        official = formats.IDX_CONTENT_MD5[family].get(path.name.removesuffix(".gz"))
        files.append(FileRecord(str(path.resolve()), content_md5 + " (decompressed)", formats.check_md5(path, content_md5, official, verify)))
        arrays.append(array)
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} images; the files do not belong together")
    if labels.max(initial=0) >= 10:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)


def _pool(images: np.ndarray, labels: np.ndarray, source_index: Optional[np.ndarray] = None) -> Pool:
    """A pool from uint8 images [N, H, W] or [N, C, H, W]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    index = np.arange(len(labels), dtype=np.int64) if source_index is None else source_index.astype(np.int64)
    return Pool(labels=labels.astype(np.int64), source_index=index, images=tensor)


def _load_idx_dataset(name: str, data_dir: Path, verify: bool) -> RawDataset:
    family = "fashion-mnist" if name == "fashion-mnist" else "mnist"
    # every file the dataset needs in one search, so a missing-data error names them all
    find_layout(data_dir, name, IDX_FOLDERS[family], _idx_names("t10k") + ([] if name == "mnist10k" else _idx_names("train")))
    files: List[FileRecord] = []
    notes: Dict[str, object] = {}
    test_x, test_y = _read_idx_pair(family, name, data_dir, "t10k", verify, files)
    if name == "mnist10k":
        if len(test_y) != MNIST10K_SOURCE_SIZE:
            raise DataError(f"{name}: needs the official MNIST test files of {MNIST10K_SOURCE_SIZE:,} images; the t10k files hold {len(test_y):,}")
        rest, held = stratified_holdout(test_y, 10, MNIST10K_TEST_SIZE, seeded_generator(FIXED_SPLIT_SEED, "mnist10k"))
        train, test = _pool(test_x[rest], test_y[rest], rest), _pool(test_x[held], test_y[held], held)
        notes["split_rule"] = (
            f"mnist10k: the 10,000 official MNIST test images split once, stratified by class, into "
            f"{len(rest)} train / {len(held)} test (fixed seed {FIXED_SPLIT_SEED}, the same for every run); "
            "source_index = row in t10k-images-idx3-ubyte"
        )
    else:
        train_x, train_y = _read_idx_pair(family, name, data_dir, "train", verify, files)
        train, test = _pool(train_x, train_y), _pool(test_x, test_y)
        notes["split_rule"] = f"{name}: official train/test files"
    mean, std = NORMALIZATION[family]
    class_names = FASHION_CLASSES if family == "fashion-mnist" else [str(d) for d in range(10)]
    return RawDataset(name, 10, (1, 28, 28), class_names, mean, std, None, train, test, files, notes=notes)


# ---- digits -------------------------------------------------------------------------------------
def _load_digits(name: str, data_dir, verify: bool) -> RawDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install 'nrcore[digits]'") from None
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    rest, held = stratified_holdout(labels, 10, DIGITS_TEST_SIZE, seeded_generator(FIXED_SPLIT_SEED, "digits"))
    notes = {
        "split_rule": f"digits: scikit-learn's 1,797 8x8 digits split once, stratified, into {len(rest)} train / {len(held)} test "
        f"(fixed seed {FIXED_SPLIT_SEED}); pixel values 0..16 scaled to 0..255",
    }
    mean, std = NORMALIZATION["digits"]
    return RawDataset(
        name, 10, (1, 8, 8), [str(d) for d in range(10)], mean, std, None,
        _pool(images[rest], labels[rest], rest), _pool(images[held], labels[held], held), notes=notes,
    )  # fmt: skip


# ---- CIFAR ---------------------------------------------------------------------------------------
CIFAR10_PICKLE_FOLDERS = ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "CIFAR10/cifar-10-batches-py", "cifar10", ".")
CIFAR10_NPZ_FOLDERS = ("cifar10", ".", "CIFAR10")
CIFAR100_FOLDERS = ("cifar-100-python", "cifar100/cifar-100-python", "CIFAR100/cifar-100-python", "cifar100", ".")
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar_file(path: Path, family: str, verify: bool, files: List[FileRecord]) -> Dict[str, object]:
    content, md5 = formats.read_cifar_pickle(path)
    files.append(FileRecord(str(path.resolve()), md5, formats.check_md5(path, md5, formats.CIFAR_FILE_MD5[family].get(path.name), verify)))
    return content


def _check_label_range(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()})")


def _cifar10_from_pickles(paths: List[Path], verify: bool, files: List[FileRecord]):
    parts = []
    for path in paths:
        images, (labels,) = formats.cifar_batch_arrays(path, _read_cifar_file(path, "cifar10", verify, files), ("labels",))
        _check_label_range(path, labels, 10)
        parts.append((images, labels))
    train_x = np.concatenate([p[0] for p in parts[:-1]])
    train_y = np.concatenate([p[1] for p in parts[:-1]])
    return train_x, train_y, parts[-1][0], parts[-1][1]


def _cifar10_from_npz(path: Path, files: List[FileRecord]):
    arrays, md5 = formats.read_npz(path, ("x_train", "y_train", "x_test", "y_test"))
    files.append(FileRecord(str(path.resolve()), md5, formats.NO_OFFICIAL_CHECKSUM))
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], np.asarray(arrays[f"y_{split}"]).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: x_{split} must be uint8 [N, 32, 32, 3], got {x.dtype} {list(x.shape)}")
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} has {len(y)} entries of {y.dtype} but x_{split} holds {len(x)} images")
        _check_label_range(path, y, 10)
        out += [x.transpose(0, 3, 1, 2), y.astype(np.int64)]
    return tuple(out)


def _load_cifar10(name: str, data_dir: Path, verify: bool) -> RawDataset:
    files: List[FileRecord] = []
    notes: Dict[str, object] = {}
    class_names = CIFAR10_CLASSES
    pickle_names = [(b,) for b in CIFAR10_BATCHES + ("test_batch",)]
    try:
        paths = find_layout(data_dir, name, CIFAR10_PICKLE_FOLDERS, pickle_names)
    except MissingDataError:
        try:
            (npz_path,) = find_layout(data_dir, name, CIFAR10_NPZ_FOLDERS, [("cifar10.npz",)])
        except MissingDataError:
            raise MissingDataError(
                f"{name}: {describe_layout(data_dir, CIFAR10_PICKLE_FOLDERS, pickle_names)}; "
                f"or {describe_layout(data_dir, CIFAR10_NPZ_FOLDERS, [('cifar10.npz',)])}"
            ) from None
        train_x, train_y, test_x, test_y = _cifar10_from_npz(npz_path, files)
        meta_path = npz_path.parent / "batches.meta"
        notes["format"] = "cifar10.npz (x_train/y_train/x_test/y_test in official order)"
    else:
        train_x, train_y, test_x, test_y = _cifar10_from_pickles(paths, verify, files)
        meta_path = paths[0].parent / "batches.meta"
        notes["format"] = "official python pickles (cifar-10-batches-py)"
    if meta_path.is_file():  # the official class names; the built-in list otherwise
        class_names = formats.cifar_label_names(meta_path, _read_cifar_file(meta_path, "cifar10", verify, files), "label_names")
        if len(class_names) != 10:
            raise DataError(f"{meta_path}: {len(class_names)} class names, CIFAR-10 has 10")
    mean, std = NORMALIZATION["cifar10"]
    return RawDataset(
        name, 10, (3, 32, 32), class_names, mean, std, CIFAR_AUGMENTATION,
        _pool(train_x, train_y), _pool(test_x, test_y), files, notes=notes,
    )  # fmt: skip


def _load_cifar100(name: str, data_dir: Path, verify: bool) -> RawDataset:
    files: List[FileRecord] = []
    train_path, test_path, meta_path = find_layout(data_dir, name, CIFAR100_FOLDERS, [("train",), ("test",), ("meta",)])
    keys = ("fine_labels", "coarse_labels")
    train_x, (train_y, train_coarse) = formats.cifar_batch_arrays(train_path, _read_cifar_file(train_path, "cifar100", verify, files), keys)
    test_x, (test_y, _) = formats.cifar_batch_arrays(test_path, _read_cifar_file(test_path, "cifar100", verify, files), keys)
    meta = _read_cifar_file(meta_path, "cifar100", verify, files)
    class_names = formats.cifar_label_names(meta_path, meta, "fine_label_names")
    coarse_names = formats.cifar_label_names(meta_path, meta, "coarse_label_names")
    for path, labels in ((train_path, train_y), (test_path, test_y)):
        _check_label_range(path, labels, 100)
    coarse_of_class = np.full(100, -1, dtype=np.int64)
    for fine in range(100):
        groups = np.unique(train_coarse[train_y == fine])
        if len(groups) != 1:
            raise DataError(f"{train_path}: fine class {fine} falls in {len(groups)} super-classes; expected exactly 1")
        coarse_of_class[fine] = groups[0]
    mean, std = NORMALIZATION["cifar100"]
    return RawDataset(
        name, 100, (3, 32, 32), class_names, mean, std, CIFAR_AUGMENTATION,
        _pool(train_x, train_y), _pool(test_x, test_y), files, coarse_of_class=coarse_of_class,
        notes={"format": "official python pickles (cifar-100-python)", "coarse_class_names": coarse_names},
    )  # fmt: skip


# ---- CIFAR-N ---------------------------------------------------------------------------------------
CIFAR_N = {
    # dataset: (image dataset, label file, key of the clean labels)
    "cifar10n": ("cifar10", "CIFAR-10_human.pt", "clean_label"),
    # the CPU protocol: the same files; its defaults (a 10,000-image subset, resnet8, ...) live in
    # the trainer's dataset defaults, and it also takes synthetic noise (on CIFAR-10's classes)
    "cifar10n-cpu": ("cifar10", "CIFAR-10_human.pt", "clean_label"),
    "cifar100n": ("cifar100", "CIFAR-100_human.pt", "clean_label"),
}
CIFAR_N_FOLDERS = ("cifar-n", "cifar-N", "CIFAR-N", "cifarn")  # then DIR/<dataset name>/ and DIR/


def image_dataset(name: str) -> str:
    """The dataset whose images and classes `name` uses (cifar10 for cifar10n and cifar10n-cpu):
    what decides the meaning of class-map noise such as CIFAR-10's asym."""
    return CIFAR_N[name][0] if name in CIFAR_N else name


def _load_cifar_n(name: str, data_dir: Path, verify: bool) -> RawDataset:
    image_dataset, file_name, clean_key = CIFAR_N[name]
    spec_keys = {spec: key for spec, (datasets, key) in REAL_LABEL_SPECS.items() if name in datasets}
    (label_path,) = find_layout(data_dir, name, CIFAR_N_FOLDERS + (name, "."), [(file_name,)])
    raw = LOADERS[image_dataset](name, data_dir, verify)
    arrays, md5 = formats.read_cifar_n(label_path, (clean_key,) + tuple(spec_keys.values()))
    raw.files.append(FileRecord(str(label_path.resolve()), md5, formats.NO_OFFICIAL_CHECKSUM))
    n = len(raw.train)
    if len(arrays[clean_key]) != n:
        raise DataError(f"{label_path}: {len(arrays[clean_key])} labels but the {image_dataset} training set has {n} images")
    mismatched = int((arrays[clean_key] != raw.train.labels).sum())
    if mismatched:
        raise DataError(
            f"{label_path}: '{clean_key}' differs from the {image_dataset} training labels at {mismatched} of {n} positions; "
            "the label file and the images are not in the same order"
        )
    for spec, key in spec_keys.items():
        _check_label_range(label_path, arrays[key], raw.num_classes)
        raw.label_sets[spec] = arrays[key]
    raw.name = name
    raw.notes["label_file"] = f"{label_path.name}: real human labels, verified aligned with the image order via '{clean_key}'"
    return raw


# ---- Clothing1M ------------------------------------------------------------------------------------
CLOTHING1M_FOLDERS = ("clothing1m", "Clothing1M", "clothing1M", "clothing-1m", ".")
CLOTHING1M_LISTS = ("noisy_label_kv.txt", "clean_label_kv.txt", "noisy_train_key_list.txt",
                    "clean_train_key_list.txt", "clean_val_key_list.txt", "clean_test_key_list.txt")  # fmt: skip


def _read_lines(path: Path) -> List[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _read_label_kv(path: Path, num_classes: int) -> Dict[str, int]:
    table = {}
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= num_classes:
            raise DataError(f"{path}:{number}: expected 'KEY LABEL' with LABEL in 0..{num_classes - 1}, got {line[:80]!r}")
        table[parts[0]] = int(parts[1])
    return table


def _clothing1m_root(data_dir: Path) -> Tuple[Path, Path]:
    """(image root, annotation folder): the lists sit in the root or in root/annotations."""
    folders = [f for base in CLOTHING1M_FOLDERS for f in (base, f"{base}/annotations")]
    paths = find_layout(data_dir, "clothing1m", folders, [(n,) for n in CLOTHING1M_LISTS])
    annotations = paths[0].parent
    root = annotations.parent if annotations.name == "annotations" else annotations
    return root, annotations


def _load_clothing1m(name: str, data_dir: Path, verify: bool) -> RawDataset:
    root, annotations = _clothing1m_root(data_dir)
    C = len(CLOTHING1M_CLASSES)
    noisy_kv = _read_label_kv(annotations / "noisy_label_kv.txt", C)
    clean_kv = _read_label_kv(annotations / "clean_label_kv.txt", C)
    lists = {k: _read_lines(annotations / f"{k}_key_list.txt") for k in ("noisy_train", "clean_train", "clean_val", "clean_test")}
    for list_name, keys in lists.items():
        table = noisy_kv if list_name == "noisy_train" else clean_kv
        missing = next((k for k in keys if k not in table), None)
        if missing is not None:
            kv = "noisy_label_kv.txt" if list_name == "noisy_train" else "clean_label_kv.txt"
            raise DataError(f"{annotations / f'{list_name}_key_list.txt'}: key {missing} has no label in {kv}")
        if keys and not (root / keys[0]).is_file():
            raise DataError(f"{root / keys[0]}: image not found; extract the Clothing1M image archives into {root / 'images'}")
    # The pool: the noisy list, then clean-train and clean-val keys not already in it.
    pool_keys = list(lists["noisy_train"])
    position = {k: i for i, k in enumerate(pool_keys)}
    for list_name in ("clean_train", "clean_val"):
        for key in lists[list_name]:
            if key not in position:
                position[key] = len(pool_keys)
                pool_keys.append(key)

    def mask(keys):
        out = np.zeros(len(pool_keys), dtype=bool)
        out[[position[k] for k in keys]] = True
        return out

    given = np.array([noisy_kv.get(k, -1) for k in pool_keys], dtype=np.int64)
    original = np.array([clean_kv.get(k, -1) for k in pool_keys], dtype=np.int64)
    test_keys = lists["clean_test"]
    # a test image must never be trained on, whatever list it also sits in
    in_test = mask([k for k in test_keys if k in position])
    noisy_candidates = mask(lists["noisy_train"]) & ~in_test
    names_path = annotations / "category_names_eng.txt"
    class_names = _read_lines(names_path) if names_path.is_file() else CLOTHING1M_CLASSES
    if len(class_names) != C:
        raise DataError(f"{names_path}: {len(class_names)} class names, Clothing1M has {C}")
    mean, std = NORMALIZATION["clothing1m"]
    size = CLOTHING1M_STORED_SIZE
    files = [FileRecord(str((annotations / n).resolve()), formats.md5_hex(formats.read_bytes(annotations / n)), formats.NO_OFFICIAL_CHECKSUM) for n in CLOTHING1M_LISTS]
    return RawDataset(
        name, C, (3, CLOTHING1M_AUGMENTATION.crop, CLOTHING1M_AUGMENTATION.crop), class_names, mean, std, CLOTHING1M_AUGMENTATION,
        Pool(original, np.arange(len(pool_keys), dtype=np.int64), source=ImageFiles(root, pool_keys, size)),
        Pool(np.array([clean_kv[k] for k in test_keys], dtype=np.int64), np.arange(len(test_keys), dtype=np.int64), source=ImageFiles(root, test_keys, size)),
        files, label_sets={"real": given},
        trusted_candidates=mask(lists["clean_train"]) & ~in_test, val_candidates=mask(lists["clean_val"]) & ~in_test,
        noisy_candidates=noisy_candidates,
        notes={
            "test_keys_removed_from_training": int(in_test.sum()),
            "format": "Clothing1M release: noisy train = noisy_train_key_list (noisy labels), trusted candidates = clean_train_key_list, "
            "val candidates = clean_val_key_list, test = clean_test_key_list (clean labels); images decoded lazily, resized to 256x256",
            "source_index": "position in noisy_train_key_list, then clean_train and clean_val keys not in it, in list order",
        },
    )  # fmt: skip


# ---- custom ----------------------------------------------------------------------------------------
def _custom_images(path: Path, x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{path}: '{key}' must be uint8 [N, H, W] or [N, H, W, C] with C 1 or 3, got {x.dtype} {list(x.shape)}")
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


def _custom_labels(path: Path, values: np.ndarray, n: int, key: str, lowest: int = 0) -> np.ndarray:
    """1-d integer labels >= `lowest` (-1 marks an unknown true label)."""
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != n or not np.issubdtype(values.dtype, np.integer) or (len(values) and values.min() < lowest):
        raise DataError(f"{path}: '{key}' must hold {n} integer labels >= {lowest}, got {values.dtype} {list(values.shape)}")
    return values.astype(np.int64)


def _trusted_indices(path: Path, trusted: np.ndarray, n: int) -> np.ndarray:
    trusted = np.asarray(trusted)
    if trusted.dtype == bool:
        if trusted.shape != (n,):
            raise DataError(f"{path}: a boolean 'trusted' mask must have {n} entries, got {list(trusted.shape)}")
        return np.flatnonzero(trusted)
    if trusted.ndim != 1 or not np.issubdtype(trusted.dtype, np.integer) or (len(trusted) and (trusted.min() < 0 or trusted.max() >= n)):
        raise DataError(f"{path}: 'trusted' must be indices in 0..{n - 1} (or a boolean mask), got {trusted.dtype} {list(trusted.shape)}")
    if len(np.unique(trusted)) != len(trusted):
        raise DataError(f"{path}: 'trusted' lists an index twice")
    return np.sort(trusted.astype(np.int64))


def _custom_dataset(name, path, x, y, y_true, trusted, x_test, y_test, class_names, files, fmt) -> RawDataset:
    n = len(x)
    num_classes = max(int(a.max(initial=0)) for a in (y, y_test, y_true if y_true is not None else y)) + 1
    if class_names is not None:
        if len(class_names) < num_classes:
            raise DataError(f"{path}: {len(class_names)} class names but labels go up to {num_classes - 1}")
        num_classes = len(class_names)
    if num_classes < 2:
        raise DataError(f"{path}: labels hold a single class; a classifier needs at least 2")
    original = y_true.copy() if y_true is not None else np.full(n, -1, dtype=np.int64)
    fixed = None
    if trusted is not None:
        fixed = _trusted_indices(path, trusted, n)
        conflicting = int(((original[fixed] >= 0) & (original[fixed] != y[fixed])).sum())
        if conflicting:
            raise DataError(f"{path}: {conflicting} trusted examples have a label different from their true label; trusted labels must be clean")
        original[fixed] = y[fixed]  # trusted labels are clean by definition
        fixed = fixed if len(fixed) else None  # a trusted column marking no row: no trusted set
    pixels = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    mean = tuple(pixels.mean((0, 2, 3)).tolist())
    std = tuple(pixels.std((0, 2, 3)).clamp_min(1e-3).tolist())
    return RawDataset(
        name, num_classes, tuple(int(d) for d in x.shape[1:]), class_names or [str(c) for c in range(num_classes)],
        mean, std, None, _pool(x, original), _pool(x_test, y_test), files,
        label_sets={"real": y}, user_labels=y, fixed_trusted=fixed,
        notes={"format": fmt, "normalization": "per-channel mean/std of the training images"},
    )  # fmt: skip


def _load_custom_npz(name: str, path: Path) -> RawDataset:
    arrays, md5 = formats.read_npz(path, ("x", "y", "x_test", "y_test"), ("y_true", "trusted", "class_names"))
    x, x_test = _custom_images(path, arrays["x"], "x"), _custom_images(path, arrays["x_test"], "x_test")
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x images are {list(x.shape[1:])} but x_test images are {list(x_test.shape[1:])}")
    y = _custom_labels(path, arrays["y"], len(x), "y")
    y_true = _custom_labels(path, arrays["y_true"], len(x), "y_true", lowest=-1) if "y_true" in arrays else None
    names = [str(s) for s in arrays["class_names"]] if "class_names" in arrays else None
    files = [FileRecord(str(path.resolve()), md5, formats.NO_OFFICIAL_CHECKSUM)]
    return _custom_dataset(
        name, path, x, y, y_true, arrays.get("trusted"), x_test, _custom_labels(path, arrays["y_test"], len(x_test), "y_test"),
        names, files, "custom .npz (x, y[, y_true, trusted], x_test, y_test)",
    )  # fmt: skip


def _read_custom_csv(path: Path) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Images [N, C, H, W], labels, true labels (or None), trusted mask (or None) of one CSV."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from None
    columns = set(rows[0]) if rows else set()
    if not rows or not {"path", "label"} <= columns:
        raise DataError(f"{path}: need a header with columns path,label[,trusted][,true_label] and at least one row")

    def cell(row_number, column, text):
        text = (text or "").strip()
        if column == "trusted":
            if text.lower() not in ("0", "1", "true", "false", ""):
                raise DataError(f"{path}:{row_number}: trusted must be 0/1/true/false, got {text!r}")
            return text.lower() in ("1", "true")
        lowest = -1 if column == "true_label" else 0  # -1: true label unknown
        if not text.lstrip("-").isdigit() or int(text) < lowest:
            raise DataError(f"{path}:{row_number}: {column} must be an integer >= {lowest}, got {text!r}")
        return int(text)

    def column_values(column, dtype):
        if column not in columns:
            return None
        return np.array([cell(i + 2, column, row[column]) for i, row in enumerate(rows)], dtype=dtype)  # row 1 is the header

    image_paths = [path.parent / row["path"] for row in rows]
    mode = image_mode(image_paths[0])  # every image is converted to the first one's mode
    first = decode_image(image_paths[0], mode)
    images = np.empty((len(rows),) + first.shape, dtype=np.uint8)
    for i, image_path in enumerate(image_paths):
        decoded = decode_image(image_path, mode)
        if decoded.shape != first.shape:
            raise DataError(f"{image_path}: image is {decoded.shape[1:]} but {image_paths[0].name} is {first.shape[1:]}; resize them to one size")
        images[i] = decoded
    return images, column_values("label", np.int64), column_values("true_label", np.int64), column_values("trusted", bool)


def _load_custom_csv(name: str, train_path: Path, test_path: Path) -> RawDataset:
    x, y, y_true, trusted = _read_custom_csv(train_path)
    x_test, y_test, _, _ = _read_custom_csv(test_path)
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{test_path}: images are {list(x_test.shape[1:])} but {train_path.name}'s are {list(x.shape[1:])}")
    files = [FileRecord(str(p.resolve()), formats.md5_hex(formats.read_bytes(p)), formats.NO_OFFICIAL_CHECKSUM) for p in (train_path, test_path)]
    return _custom_dataset(
        name, train_path, x, y, y_true, trusted, x_test, y_test, None, files,
        "custom CSV (train.csv/test.csv: path,label[,trusted][,true_label]); images decoded with Pillow",
    )  # fmt: skip


def _load_custom(name: str, data_dir: Path, verify: bool) -> RawDataset:
    if data_dir.is_file():
        if data_dir.suffix != ".npz":
            raise DataError(f"{data_dir}: custom data must be an .npz file or a folder with data.npz or train.csv and test.csv")
        return _load_custom_npz(name, data_dir)
    if (data_dir / "data.npz").is_file():
        return _load_custom_npz(name, data_dir / "data.npz")
    if (data_dir / "train.csv").is_file() and (data_dir / "test.csv").is_file():
        return _load_custom_csv(name, data_dir / "train.csv", data_dir / "test.csv")
    raise MissingDataError(f"custom: found neither {data_dir / 'data.npz'} nor {data_dir / 'train.csv'} with {data_dir / 'test.csv'}")


# ---- download (optional, torchvision) ---------------------------------------------------------------
TORCHVISION_DATASETS = {
    "mnist": "MNIST", "mnist10k": "MNIST", "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10", "cifar10n": "CIFAR10", "cifar10n-cpu": "CIFAR10", "cifar100": "CIFAR100", "cifar100n": "CIFAR100",
}  # fmt: skip


def fetch_with_torchvision(name: str, data_dir: Path) -> None:
    """Fetch `name`'s official files into data_dir with torchvision (its layouts are among
    those we search). CIFAR-N label files and Clothing1M cannot be downloaded this way."""
    if name not in TORCHVISION_DATASETS:
        raise DataError(f"{name}: --download (download=True) cannot fetch it (torchvision does not know it); {LAYOUT_HINTS[name]}")
    try:
        import torchvision.datasets as tv_datasets
    except Exception as exc:  # PyPI torchvision can fail to import against a CPU torch
        raise DataError(
            f"{name}: --download (download=True) needs an importable torchvision (pip install 'nrcore[vision]'; import failed: {type(exc).__name__}: {exc}); "
            f"or {LAYOUT_HINTS[name]}"
        ) from None
    cls = getattr(tv_datasets, TORCHVISION_DATASETS[name])
    for train in (True, False):
        cls(root=str(data_dir), train=train, download=True)


LOADERS: Dict[str, Callable[[str, Path, bool], RawDataset]] = {
    "mnist": _load_idx_dataset,
    "mnist10k": _load_idx_dataset,
    "fashion-mnist": _load_idx_dataset,
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "cifar10n": _load_cifar_n,
    "cifar10n-cpu": _load_cifar_n,
    "cifar100n": _load_cifar_n,
    "clothing1m": _load_clothing1m,
    "custom": _load_custom,
}


def load_dataset(name: str, data_dir=None, *, download: bool = False, verify_checksums: bool = True) -> RawDataset:
    """A dataset as its files hold it. `data_dir` None means $NRCORE_DATA; `download` fetches
    missing official files with torchvision when it is installed."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits(name, None, verify_checksums)
    root = resolve_data_dir(data_dir, name, create=download)
    try:
        return LOADERS[name](name, root, verify_checksums)
    except MissingDataError as missing:
        if not download:
            offer = " (or pass --download, download=True in Python, with torchvision installed)" if name in TORCHVISION_DATASETS else ""
            raise MissingDataError(f"{missing}; {LAYOUT_HINTS[name]}{offer}") from None
    fetch_with_torchvision(name, root)
    return LOADERS[name](name, root, verify_checksums)
