"""Seeded, class-aware splitting: the trusted set, the clean validation split and fixed
stratified hold-outs (mnist10k, digits).

One seeded permutation of the pool orders the examples of each class. The trusted set takes
the first k of every class and the validation split the last ones, so the trusted set depends
only on (seed, clean size) and the validation split only on (seed, val size): growing one never
reshuffles the other, and a larger trusted set contains the smaller one.
"""

from __future__ import annotations

import hashlib
from typing import List, Optional, Tuple

import numpy as np
import torch


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, purpose), stable across runs and platforms."""
    digest = hashlib.sha256(f"nrcore.data:{purpose}:{int(seed)}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def class_orders(labels: np.ndarray, num_classes: int, generator: torch.Generator, candidates: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """For each class c, the indices i with labels[i] == c (and candidates[i], when a mask is
    given) in one seeded random order. The same generator state gives the same order whatever
    the mask, so two masks over one pool see consistent orders."""
    perm = torch.randperm(len(labels), generator=generator).numpy()
    if candidates is not None:
        perm = perm[candidates[perm]]
    ordered = labels[perm]
    return [perm[ordered == c] for c in range(num_classes)]


def largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer per-class quotas proportional to `counts` that sum exactly to `total`."""
    counts = np.asarray(counts, dtype=np.float64)
    if total > counts.sum():
        raise ValueError(f"cannot take {total} examples from {int(counts.sum())}")
    quotas = total * counts / counts.sum()
    base = np.floor(quotas).astype(np.int64)
    short = int(total - base.sum())
    order = np.argsort(-(quotas - base), kind="stable")  # ties: lower class id first
    base[order[:short]] += 1
    return base


def stratified_holdout(labels: np.ndarray, num_classes: int, n_holdout: int, generator: torch.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, holdout), holdout of size `n_holdout` with class proportions
    kept (largest remainder). Both sorted."""
    orders = class_orders(labels, num_classes, generator)
    quotas = largest_remainder(np.array([len(o) for o in orders]), n_holdout)
    holdout = np.concatenate([o[:q] for o, q in zip(orders, quotas)])
    rest = np.concatenate([o[q:] for o, q in zip(orders, quotas)])
    return np.sort(rest), np.sort(holdout)


def per_class_trusted_count(clean_size: float, num_classes: int) -> int:
    """Whole examples per class for a requested trusted-set size (rounded half up)."""
    per_class = int(clean_size / num_classes + 0.5)
    if per_class < 1:
        raise ValueError(
            f"a trusted set of {clean_size:g} examples rounds to 0 per class over {num_classes} classes; "
            f"ask for at least {(num_classes + 1) // 2} (--clean-size, or a larger --clean-frac)"
        )
    return per_class


def largest_trusted_set(orders: List[np.ndarray]) -> int:
    """The largest class-balanced trusted set these class orders can give."""
    return len(orders) * min(len(o) for o in orders)


def draw_trusted(orders: List[np.ndarray], per_class: int) -> np.ndarray:
    """The first `per_class` of every class order (sorted indices)."""
    for c, order in enumerate(orders):
        if len(order) < per_class:
            raise ValueError(
                f"the trusted set needs {per_class} examples of class {c} but only {len(order)} are available; "
                f"--clean-size can be at most {largest_trusted_set(orders)} here"
            )
    return np.sort(np.concatenate([order[:per_class] for order in orders]))


def draw_val(orders: List[np.ndarray], size: int, taken: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """`size` examples with the class proportions of `orders`, taken from the END of each class
    order and skipping `taken` (the trusted set). Per-class counts depend only on the orders, so
    the split does not move when the trusted set (drawn from the front) grows.
    Returns (sorted indices, per-class counts)."""
    counts = np.array([len(o) for o in orders])
    if size > counts.sum():
        raise ValueError(f"val size {size} exceeds the {int(counts.sum())} examples available (--val-size)")
    quotas = largest_remainder(counts, size)
    chosen = []
    for c, (order, quota) in enumerate(zip(orders, quotas)):
        available = order if taken is None else order[~np.isin(order, taken)]
        if quota > len(available):
            raise ValueError(
                f"the val split needs {quota} examples of class {c} but only {len(available)} are left after the trusted set; "
                "lower --val-size or the trusted set (--clean-size/--clean-frac)"
            )
        chosen.append(available[len(available) - quota :])
    return np.sort(np.concatenate(chosen)), quotas
