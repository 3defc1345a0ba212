"""`build_task`: a dataset, a noise model and the trusted/validation splits, as one `Task`;
`save_task_labels`: the run's labels and split indices on disk, for audit and reproduction.

Order of operations (docs/data.md, "Splits"):
0. with `train_size`: a class-balanced subset of the training pool, drawn from `data_seed` (not
   the run seed, so every run seed trains on the same images); it becomes the noisy training
   set, and steps 1-2 draw from the rest of the pool;
1. the trusted set: class-balanced, drawn from the ORIGINAL clean labels of the training pool;
2. the clean validation split: class proportions kept, disjoint from the trusted set;
3. the noisy training set: everything else (the subset, with `train_size`); only it gets noisy
   labels. Synthetic noise is drawn for every pool example from one seeded generator and then
   kept for the noisy set, so the noisy label of an example depends only on (seed, example),
   not on the split sizes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from nrcore.data import formats
from nrcore.data.datasets import RawDataset, image_dataset, load_dataset
from nrcore.data.errors import DataError
from nrcore.data.noise import (
    REAL_LABEL_SPECS,
    NoiseSpec,
    empirical_transition,
    expected_noise_rate,
    sample_noisy_labels,
)
from nrcore.data.splits import class_orders, draw_trusted, draw_val, largest_trusted_set, per_class_trusted_count, seeded_generator
from nrcore.data.types import SPLIT_NAMES, Split, Task

# Datasets whose labels come from files of real noisy labels: the specs they accept.
REAL_LABEL_DATASETS = {
    name: ("clean",) + tuple(spec for spec, (datasets, _) in REAL_LABEL_SPECS.items() if name in datasets)
    for name in ("cifar10n", "cifar100n", "clothing1m")
}
REAL_LABEL_DATASETS["clothing1m"] = ("real",)  # its noisy set has no clean labels to start from


def check_noise_for_dataset(spec: NoiseSpec, dataset: str) -> None:
    """Reject a noise spec the dataset cannot provide (before any file is read)."""
    allowed = REAL_LABEL_DATASETS.get(dataset)
    if allowed is not None and str(spec) not in allowed:
        twin = {"cifar10n": "cifar10", "cifar100n": "cifar100"}.get(dataset)
        hint = f"; for synthetic noise use --dataset {twin}" if twin and spec.is_synthetic else ""
        raise ValueError(f"dataset {dataset!r} takes noise {', '.join(allowed)}, not {str(spec)!r}{hint}")
    if spec.is_real and dataset not in REAL_LABEL_SPECS[spec.kind][0]:
        raise ValueError(f"noise {str(spec)!r} uses the real labels of {', '.join(REAL_LABEL_SPECS[spec.kind][0])}, not of {dataset!r}")


def _trusted_request(clean_size, clean_frac, base: int) -> Optional[float]:
    """The requested trusted-set size in examples (None: no trusted set)."""
    if clean_size is not None and clean_frac is not None:
        raise ValueError("give clean_size (--clean-size) or clean_frac (--clean-frac), not both")
    if clean_size is not None:
        if isinstance(clean_size, bool) or not isinstance(clean_size, (int, np.integer)) or clean_size < 0:
            raise ValueError(f"clean_size (--clean-size) must be a non-negative int, got {clean_size!r}")
        return float(clean_size) or None
    if clean_frac is not None:
        if not 0.0 <= float(clean_frac) < 1.0:
            raise ValueError(f"clean_frac (--clean-frac) must be in [0, 1), got {clean_frac!r}")
        return float(clean_frac) * base or None
    return None


def _val_count(val_size: Union[int, float], base: int) -> int:
    """val_size >= 1: a count; in (0, 1): a fraction of the training set; 0: none."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)) or val_size < 0:
        raise ValueError(f"val_size must be a count >= 1, a fraction in (0, 1) or 0, got {val_size!r}")
    if 0 < val_size < 1:
        return int(round(float(val_size) * base))
    if float(val_size) != int(val_size):
        raise ValueError(f"val_size {val_size!r} is neither a whole count nor a fraction in (0, 1)")
    return int(val_size)


def _make_split(raw: RawDataset, indices: np.ndarray, labels: np.ndarray, true_labels: np.ndarray) -> Split:
    images, source = raw.train.select_inputs(indices)
    return Split(
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        true_labels=torch.from_numpy(np.ascontiguousarray(true_labels, dtype=np.int64)),
        source_index=torch.from_numpy(raw.train.source_index[indices]),
        images=images,
        source=source,
    )


def _per_class(labels: np.ndarray, num_classes: int) -> list:
    return np.bincount(labels[labels >= 0], minlength=num_classes).tolist()


def build_task(
    dataset: str,
    *,
    data_dir: Union[str, Path, None] = None,
    noise: Union[str, NoiseSpec] = "clean",
    clean_size: Optional[int] = None,
    clean_frac: Optional[float] = None,
    val_size: Union[int, float] = 0,
    seed: int = 0,
    use_clean_in_train: bool = False,
    train_size: Optional[int] = None,
    data_seed: int = 0,
    cv_fold: Optional[Tuple[int, int]] = None,
    download: bool = False,
    verify_checksums: bool = True,
) -> Task:
    """Load `dataset`, draw the trusted and validation splits, apply `noise` to the rest.

    data_dir:            the data folder (None: $NRCORE_DATA); `docs/data.md` lists the layouts
    noise:               a `NoiseSpec` or its string ("clean", "sym80", "asym40", "aggre", ...)
    clean_size / clean_frac:
                         the trusted set: a count, or a fraction of the training set; rounded to
                         whole per-class counts (reported); both None: no trusted set
    val_size:            clean validation split: a count >= 1, a fraction in (0, 1) of the
                         training set, or 0 for none
    seed:                fixes the trusted/val draws and the noise
    use_clean_in_train:  append the trusted examples (clean labels) to the training split
    train_size:          train on a class-balanced subset of this many pool examples (drawn
                         from `data_seed`); the trusted and validation splits come from the
                         rest, and fractions (clean_frac, val_size < 1) are of train_size
    data_seed:           fixes the `train_size` subset (default 0; independent of `seed`)
    cv_fold:             (k, K): cross-validation; the noisy training set is cut into K folds
                         (stratified by the noisy label, drawn from `seed`), fold k (1-based) is
                         the `holdout` split and the rest is `train`
    download:            fetch missing official files with torchvision (when installed)
    verify_checksums:    check files with known official checksums (a mismatch is an error)
    """
    spec = NoiseSpec.parse(noise)
    check_noise_for_dataset(spec, dataset)
    raw = load_dataset(dataset, data_dir, download=download, verify_checksums=verify_checksums)
    return task_from_dataset(
        raw, spec, clean_size=clean_size, clean_frac=clean_frac, val_size=val_size, seed=seed,
        use_clean_in_train=use_clean_in_train, train_size=train_size, data_seed=data_seed, cv_fold=cv_fold,
    )  # fmt: skip


def _original_labels(raw: RawDataset, spec: NoiseSpec) -> np.ndarray:
    """The original (clean) label of every pool example, -1 where unknown."""
    if raw.user_labels is None or spec.is_real:
        return raw.train.labels.copy()
    # custom data under a synthetic (or no) noise model: its labels are the original ones
    known = raw.train.labels >= 0
    conflicting = int((known & (raw.train.labels != raw.user_labels)).sum())
    if conflicting:
        raise DataError(
            f"custom data: y differs from y_true at {conflicting} examples, so its labels are already noisy; "
            "use noise 'real' (or drop y_true)"
        )
    return raw.user_labels.copy()


def _candidates(mask: Optional[np.ndarray], known: np.ndarray) -> np.ndarray:
    return known if mask is None else known & mask


def _check_train_size(train_size) -> Optional[int]:
    if train_size is None:
        return None
    if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or train_size < 1:
        raise ValueError(f"--train-size must be a positive whole number of examples, got {train_size!r}")
    return int(train_size)


def _cv_fold(labels: np.ndarray, num_classes: int, fold: Tuple[int, int], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(positions kept for training, positions of fold k) of K folds of the noisy training set,
    stratified by its (noisy) labels: each class's examples, in a seeded order, dealt to the folds
    in turn (as scikit-learn's StratifiedKFold, which cleanlab's recipe uses)."""
    k, K = fold
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 2 or not 1 <= k <= K:
        raise ValueError(f"--cv-fold must be K/N with N >= 2 folds and 1 <= K <= N, got {k}/{K}")
    if len(labels) < K:
        raise ValueError(f"--cv-fold {k}/{K}: the noisy training set has only {len(labels)} examples")
    fold_of = np.empty(len(labels), dtype=np.int64)
    for order in class_orders(labels, num_classes, seeded_generator(seed, "cv-folds")):
        fold_of[order] = np.arange(len(order)) % K
    held = fold_of == k - 1
    return np.flatnonzero(~held), np.flatnonzero(held)


def _draw_train_subset(raw: RawDataset, original: np.ndarray, noisy_candidates: np.ndarray, train_size: int, data_seed: int):
    """(bool mask over the pool of the class-balanced `train_size` subset, per-class counts).
    Classes get equal shares (the remainder to the lowest class ids), drawn on the original
    labels from a generator that depends only on `data_seed`."""
    C = raw.num_classes
    candidates = noisy_candidates & (original >= 0)
    available = int(candidates.sum())
    if train_size > available:
        unknown = int((noisy_candidates & (original < 0)).sum())
        known = f" with a known original label ({unknown} have none)" if unknown else ""
        raise ValueError(f"--train-size {train_size} exceeds the {available} training examples of {raw.name}{known}")
    if train_size < C:
        raise ValueError(f"--train-size {train_size} is smaller than the {C} classes of {raw.name}; a class-balanced subset needs at least {C}")
    quotas = np.full(C, train_size // C, dtype=np.int64)
    quotas[: train_size % C] += 1
    orders = class_orders(original, C, seeded_generator(data_seed, "train-subset"), candidates)
    for c, (order, quota) in enumerate(zip(orders, quotas)):
        if len(order) < quota:
            raise ValueError(
                f"--train-size {train_size} needs {quota} examples of class {c} ({raw.class_names[c]}) "
                f"but {raw.name} has {len(order)}; at most {C * min(len(o) for o in orders)} keeps the subset class-balanced"
            )
    mask = np.zeros(len(original), dtype=bool)
    mask[np.concatenate([order[:quota] for order, quota in zip(orders, quotas)])] = True
    return mask, quotas


def _outside_subset(error: ValueError, train_size: Optional[int]) -> ValueError:
    """A validation draw that failed for lack of examples, said in terms of --train-size."""
    if train_size is None:
        return error
    return ValueError(f"{error}, or --train-size ({train_size}: the split is drawn from outside that subset)")


def _draw_trusted(raw: RawDataset, original: np.ndarray, requested: Optional[float], seed: int, base: int,
                  train_size: Optional[int] = None, exclude: Optional[np.ndarray] = None):
    """(trusted indices, per-class count or None); `exclude` marks pool examples it may not take
    (the `train_size` subset)."""
    if raw.fixed_trusted is not None:
        if requested is not None:
            raise ValueError("this custom dataset marks its trusted examples; leave clean_size and clean_frac unset")
        return raw.fixed_trusted, None
    if requested is None:
        return np.zeros(0, dtype=np.int64), None
    per_class = per_class_trusted_count(requested, raw.num_classes)
    candidates = _candidates(raw.trusted_candidates, original >= 0)
    if exclude is not None:
        candidates = candidates & ~exclude
    if not candidates.any():
        raise DataError(f"{raw.name}: no example has a known clean label to draw a trusted set from (give y_true or mark trusted rows)")
    orders = class_orders(original, raw.num_classes, seeded_generator(seed, "split"), candidates)
    short = next(((c, len(o)) for c, o in enumerate(orders) if len(o) < per_class), None)
    if short is not None:
        largest = largest_trusted_set(orders)
        where = f" outside the --train-size {train_size} subset" if train_size is not None else ""
        lower = ", or lower --train-size" if train_size is not None else ""
        raise ValueError(
            f"the trusted set needs {per_class} examples of class {short[0]} but only {short[1]} are available{where}; "
            f"the largest it can be here is {largest} (--clean-size {largest} or --clean-frac {largest / base:.4g}){lower}"
        )
    return draw_trusted(orders, per_class), per_class


def _noisy_labels(raw: RawDataset, spec: NoiseSpec, original: np.ndarray, noisy_idx: np.ndarray, seed: int):
    """(labels of the noisy set, transition matrix, expected noise rate or None)."""
    if spec.is_real:
        observed = raw.label_sets[spec.kind][noisy_idx]
        return observed, empirical_transition(original[noisy_idx], observed, raw.num_classes), None
    true = original[noisy_idx]
    unknown = int((true < 0).sum())
    if unknown:
        raise DataError(f"{raw.name}: {unknown} training examples have no original label, so noise {spec} cannot be applied")
    T = spec.transition_matrix(raw.num_classes, dataset=image_dataset(raw.name), coarse_of_class=raw.coarse_of_class, seed=seed)
    if spec.kind == "clean":
        observed = true.copy()
    else:  # drawn for the whole pool, so an example's label does not depend on the split sizes
        observed = sample_noisy_labels(np.maximum(original, 0), T, seeded_generator(seed, "noise"))[noisy_idx]
    return observed, T, expected_noise_rate(T, true)


def _error_rate(labels: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """Fraction of labels differing from the truth, over examples whose truth is known."""
    known = truth >= 0
    return float((labels[known] != truth[known]).mean()) if known.any() else None


def task_from_dataset(
    raw: RawDataset,
    noise: Union[str, NoiseSpec],
    *,
    clean_size: Optional[int] = None,
    clean_frac: Optional[float] = None,
    val_size: Union[int, float] = 0,
    seed: int = 0,
    use_clean_in_train: bool = False,
    train_size: Optional[int] = None,
    data_seed: int = 0,
    cv_fold: Optional[Tuple[int, int]] = None,
) -> Task:
    """`build_task` on an already loaded `RawDataset` (same arguments)."""
    spec = NoiseSpec.parse(noise)
    check_noise_for_dataset(spec, raw.name)
    C = raw.num_classes
    train_size = _check_train_size(train_size)
    if train_size is not None and raw.fixed_trusted is not None:
        raise ValueError("--train-size: this custom dataset marks its trusted examples, so its training set cannot be subsampled")
    noisy_candidates = np.ones(len(raw.train), dtype=bool) if raw.noisy_candidates is None else raw.noisy_candidates
    original = _original_labels(raw, spec)

    # 0. the training subset (the pool of the noisy set); 1.-2. draw from the rest
    subset = subset_counts = None
    if train_size is not None:
        subset, subset_counts = _draw_train_subset(raw, original, noisy_candidates, train_size, data_seed)
        noisy_candidates = subset
    base = int(noisy_candidates.sum())  # "the training set" for clean_frac and val_size fractions
    requested = _trusted_request(clean_size, clean_frac, base)
    if use_clean_in_train and requested is None and raw.fixed_trusted is None:
        raise ValueError("use_clean_in_train needs a trusted set (clean_size or clean_frac)")

    # 1. trusted set; 2. clean validation split
    trusted, per_class = _draw_trusted(raw, original, requested, seed, base, train_size, exclude=subset)
    n_val = _val_count(val_size, base)
    val = val_counts = None
    if n_val:
        val_candidates = _candidates(raw.val_candidates, original >= 0)
        if subset is not None:
            val_candidates = val_candidates & ~subset
        orders = class_orders(original, C, seeded_generator(seed, "split"), val_candidates)
        try:
            val, val_counts = draw_val(orders, n_val, taken=trusted)
        except ValueError as exc:
            raise _outside_subset(exc, train_size) from None

    # 3. the noisy training set: everything else (the subset, with train_size)
    in_noisy = noisy_candidates.copy()
    in_noisy[trusted] = False
    if val is not None:
        in_noisy[val] = False
    noisy_idx = np.flatnonzero(in_noisy)
    observed, T, expected = _noisy_labels(raw, spec, original, noisy_idx, seed)
    realized = _error_rate(observed, original[noisy_idx])
    holdout = None
    if cv_fold is not None:  # after the noise: every fold run sees the same noisy labels
        keep, held = _cv_fold(observed, C, cv_fold, seed)
        holdout = _make_split(raw, noisy_idx[held], observed[held], original[noisy_idx[held]])
        noisy_idx, observed = noisy_idx[keep], observed[keep]

    train_idx = np.concatenate([noisy_idx, trusted]) if use_clean_in_train else noisy_idx
    train_labels = np.concatenate([observed, original[trusted]]) if use_clean_in_train else observed
    task_splits = {
        "train": _make_split(raw, train_idx, train_labels, original[train_idx]),
        "clean": _make_split(raw, trusted, original[trusted], original[trusted]) if len(trusted) else None,
        "holdout": holdout,
        "val": _make_split(raw, val, original[val], original[val]) if val is not None else None,
        "test": Split(
            labels=torch.from_numpy(raw.test.labels),
            true_labels=torch.from_numpy(raw.test.labels),
            source_index=torch.from_numpy(raw.test.source_index),
            images=raw.test.images,
            source=raw.test.source,
        ),
    }
    info = {
        "dataset": raw.name,
        "num_classes": C,
        "input_shape": list(raw.input_shape),
        "seed": int(seed),
        "noise": str(spec),
        "noise_description": spec.describe(C, image_dataset(raw.name)),
        "noise_rate_nominal": spec.rate,
        "noise_rate_expected": expected,
        "noise_rate_realized": realized,
        "noise_rate_realized_over": int((original[noisy_idx] >= 0).sum()),
        "train_label_error_rate": _error_rate(train_labels, original[train_idx]),
        "train_subset": None if subset is None else {
            "size": int(train_size),
            "data_seed": int(data_seed),
            "per_class": subset_counts.tolist(),
            "rule": f"class-balanced subset of the {len(raw.train)}-example training pool drawn from data seed {int(data_seed)} "
            "(the same for every run seed); the trusted and validation splits come from the rest of the pool",
        },
        "sizes": {
            "pool": len(raw.train),
            "train": len(train_idx),
            "train_noisy": len(noisy_idx),
            "clean": len(trusted),
            "val": 0 if val is None else len(val),
            "test": len(raw.test),
            "holdout": 0 if holdout is None else len(holdout),
        },
        "cv_fold": None if cv_fold is None else {"fold": int(cv_fold[0]), "folds": int(cv_fold[1]),
                                                  "rule": "stratified by the noisy label, drawn from the seed, after the noise"},
        "clean_size_requested": clean_size,
        "clean_frac_requested": clean_frac,
        "clean_per_class_requested": per_class,
        "clean_rule": (
            "marked in the custom data file" if raw.fixed_trusted is not None
            else None if per_class is None
            else f"class-balanced from the original labels: {per_class} per class x {C} classes = {len(trusted)} "
            f"(requested {requested:g}, rounded to whole per-class counts)"
        ),
        "clean_per_class": _per_class(original[trusted], C),
        "val_size_requested": val_size,
        "val_per_class": None if val_counts is None else val_counts.tolist(),
        "use_clean_in_train": bool(use_clean_in_train),
        "train_per_class_noisy_labels": _per_class(observed, C),
        "test_per_class": _per_class(raw.test.labels, C),
        "normalization": {"mean": list(raw.mean), "std": list(raw.std)},
        "augmentation": str(raw.augmentation) if raw.augmentation else "none",
        "data_files": [f.as_dict() for f in raw.files],
        "checksums_verified": all(f.checksum == formats.VERIFIED for f in raw.files) if raw.files else None,
        **raw.notes,
    }  # fmt: skip
    return Task(
        dataset=raw.name,
        num_classes=C,
        input_shape=tuple(raw.input_shape),
        noise=spec,
        noise_rate_nominal=spec.rate,
        noise_rate_realized=math.nan if realized is None else realized,
        transition_matrix=T,
        class_names=list(raw.class_names),
        info=info,
        mean=tuple(raw.mean),
        std=tuple(raw.std),
        augmentation=raw.augmentation,
        **task_splits,
    )


# ---- saving the labels of a run --------------------------------------------------------------------
LABELS_DIR = "labels"
LABEL_FILES = {
    "{split}_labels.npy": "int64 [N]: the labels the run used (noisy for train)",
    "{split}_true_labels.npy": "int64 [N]: the original labels (-1 where unknown)",
    "{split}_source_index.npy": "int64 [N]: index of each example in the dataset's original split/file",
    "{split}_keys.txt": "streamed splits (Clothing1M): the image key of each example, one per line",
    "transition_matrix.npy": "float64 [C, C]: nominal T (synthetic noise) or empirical T (real labels)",
    "manifest.json": "what each file holds, and task.info (dataset, noise, seed, sizes, data files, checksums)",
}


def save_task_labels(task: Task, run_dir: Union[str, Path]) -> Dict[str, Path]:
    """Write the labels and split indices of `task` under run_dir/labels/ (see `LABEL_FILES`);
    returns {file name: path}. With `use_clean_in_train` the last len(clean) rows of the train
    files are the trusted examples."""
    out = Path(run_dir) / LABELS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}

    def save(name: str, array: np.ndarray) -> None:
        written[name] = out / name
        np.save(written[name], array)

    for name in SPLIT_NAMES:
        split = getattr(task, name)
        if split is None:
            continue
        save(f"{name}_labels.npy", split.labels.numpy())
        save(f"{name}_true_labels.npy", split.true_labels.numpy())
        save(f"{name}_source_index.npy", split.source_index.numpy())
        if split.source is not None and hasattr(split.source, "keys"):
            written[f"{name}_keys.txt"] = out / f"{name}_keys.txt"
            written[f"{name}_keys.txt"].write_text("\n".join(split.source.keys) + "\n", encoding="utf-8")
    if task.transition_matrix is not None:
        save("transition_matrix.npy", task.transition_matrix.numpy())
    written["manifest.json"] = out / "manifest.json"
    manifest = {"files": {name: _describe_file(name) for name in sorted(written)}, "task_info": task.info}
    written["manifest.json"].write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
    return written


def _describe_file(name: str) -> str:
    for pattern, meaning in LABEL_FILES.items():
        split, _, rest = name.partition("_")
        if pattern == name or (split in SPLIT_NAMES and pattern == "{split}_" + rest):
            return meaning
    raise KeyError(name)


def load_task_labels(run_dir: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The arrays `save_task_labels` wrote, by file stem (e.g. "train_labels")."""
    folder = Path(run_dir) / LABELS_DIR
    if not folder.is_dir():
        raise DataError(f"{folder}: no saved labels (save_task_labels writes them)")
    return {path.stem: np.load(path, allow_pickle=False) for path in sorted(folder.glob("*.npy"))}
