"""The data contract between the data layer, the trainer and the methods.

A `Task` is everything one training run reads: the noisy training split the method learns
from, the trusted (clean) split, an optional clean validation split for model selection, and
the test split. Batches come out of `Task.loader(...)` as `Batch` objects already on the
model's device, augmented and normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch

# Batches and their making live in loader.py, which imports nothing from here (no cycle);
# re-exported, as they are part of the data contract.
from nrcore.data.loader import Augmentation, Batch, BatchLoader, make_loader

__all__ = ["SPLIT_NAMES", "Augmentation", "Batch", "BatchLoader", "Split", "Task"]

SPLIT_NAMES = ("train", "clean", "val", "test", "holdout")


@dataclass
class Split:
    """One split held in memory (`images` uint8 [N, C, H, W]) or streamed (`images` None and
    `source` an object the loader knows how to stream, e.g. Clothing1M).

    labels:       int64 [N], what methods see (noisy labels for the training split)
    true_labels:  int64 [N], the original labels (analysis only; equal to `labels` for clean splits;
                  -1 where unknown: Clothing1M's noisy set, custom data without `y_true`)
    source_index: int64 [N], index of each example in the dataset's original split (audit trail)
    """

    labels: torch.Tensor
    true_labels: torch.Tensor
    source_index: torch.Tensor
    images: Optional[torch.Tensor] = None
    source: Any = None
    # device copies of `images` made by the loader (images never change after build_task)
    _device_images: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def images_on(self, device: torch.device) -> torch.Tensor:
        """`images` on `device`, copied there once and kept."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.images
        key = str(device)
        if key not in self._device_images:
            self._device_images[key] = self.images.to(device)
        return self._device_images[key]

    @property
    def is_noisy(self) -> torch.Tensor:
        """bool [N]: label differs from the original label (False where that is unknown)."""
        return (self.labels != self.true_labels) & (self.true_labels >= 0)


@dataclass
class Task:
    """A dataset with a noise model applied and the trusted/validation splits drawn.

    Built by `nrcore.data.build_task`. `train` is the noisy training set and never shares an
    example with `clean` or `val` (docs/method-contract.md, "Splits and what is reported"); with `use_clean_in_train` the trusted examples
    are appended to it (last rows, clean labels). `clean` is None when no trusted set was asked
    for; `val` is None without `--val-size`.

    mean, std:     per-channel normalisation (of pixel values in [0, 1]) applied by `loader`
    augmentation:  what `loader(..., augment=True)` does; None: the dataset has no augmentation
    """

    dataset: str
    num_classes: int
    input_shape: tuple  # (C, H, W)
    train: Split
    test: Split
    clean: Optional[Split] = None
    val: Optional[Split] = None
    holdout: Optional[Split] = None  # with cv_fold: the noisy training examples of the held-out fold
    noise: Any = None  # nrcore.data.NoiseSpec
    noise_rate_nominal: Optional[float] = None
    noise_rate_realized: float = 0.0
    transition_matrix: Optional[torch.Tensor] = None  # [C, C] float64, T[c, c'] = P(noisy c' | true c)
    class_names: Optional[list] = None
    info: dict = field(default_factory=dict)  # sizes, seeds, choices: copied into summary.json
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    augmentation: Optional[Augmentation] = None

    def split(self, name: str) -> Split:
        """The split called `name` ("train", "clean", "val", "test" or "holdout")."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(SPLIT_NAMES)}")
        split = getattr(self, name)
        if split is None:
            hint = {"clean": "build_task(clean_size=... or clean_frac=...)", "holdout": "build_task(cv_fold=(k, K))"}.get(name, "build_task(val_size=...)")
            raise ValueError(f"this task has no {name!r} split; ask for one with {hint}")
        return split

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str = "cpu",
        num_workers: Optional[int] = None,
        ranks=None,
    ) -> "BatchLoader":
        """Batches of split `split` ("train", "clean", "val" or "test").

        shuffle:     a new order every pass, drawn from `generator`
        augment:     apply `self.augmentation` (no-op for datasets without one)
        generator:   CPU generator for the order and the augmentation draws; None uses torch's
                     global generator (as `torch.utils.data.DataLoader` does)
        device:      where batches are built; in-memory images are copied there once
        num_workers: decoding processes for streamed splits (Clothing1M); ignored otherwise
        ranks:       a nrcore.parallel.Ranks of several processes: each global batch is cut in
                     slices and this rank gets its own (`Batch.offset`, `Batch.whole_size`)
        """
        return make_loader(
            self, self.split(split), batch_size, shuffle=shuffle, augment=augment, drop_last=drop_last,
            generator=generator, device=device, num_workers=num_workers, ranks=ranks,
        )

    def batch(
        self,
        split: str,
        index: torch.Tensor,
        *,
        augment: bool = True,
        generator: Optional[torch.Generator] = None,
        device: torch.device | str | None = None,
        offset: int = 0,
        whole_size: Optional[int] = None,
    ) -> Batch:
        """The examples at positions `index` (int64 [B]) of split `split` as one Batch, made as
        `loader` makes its batches (the same augmentation draws from `generator`, None: torch's
        global generator; the same crop/flip and normalisation), e.g. a second augmented view of
        a training batch (DivideMix). Datasets without an augmentation give the unaugmented
        images. `index` may be on the CPU or on `device` (default: index's device); nothing is
        read back to the host and every copy to the device is non-blocking, so a training step
        may call this without a host-device sync. `offset`, `whole_size`: the batch is rows
        `offset ...` of a global batch of `whole_size` (a rank's slice under torchrun, as
        `Batch.offset`/`Batch.whole_size`), whose draws it makes so that every rank's generator
        stays in step. In-memory splits only."""
        from nrcore.data.loader import _BatchTransform

        source = self.split(split)
        if source.images is None:
            raise ValueError(f"Task.batch needs the {split!r} images in memory; this split is streamed from files")
        device = index.device if device is None else torch.device(device)
        nb = device.type == "cuda"
        on_device = index.to(device, non_blocking=nb)
        x = source.images_on(device).index_select(0, on_device)
        x = _BatchTransform(self, device)(x, augment, generator, offset=offset, whole_size=whole_size)
        if index.device.type == "cpu":
            y, y_true = source.labels[index], source.true_labels[index]
        else:
            y, y_true = source.labels.to(device, non_blocking=nb)[on_device], source.true_labels.to(device, non_blocking=nb)[on_device]
        return Batch(x=x, y=y.to(device, non_blocking=nb), index=on_device, y_true=y_true.to(device, non_blocking=nb),
                     whole_size=whole_size, offset=offset)  # fmt: skip
