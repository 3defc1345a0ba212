"""The data contract between the data layer, the trainer and the methods.

A `Task` is everything one training run reads: the noisy training split the method learns
from, the trusted (clean) split, an optional clean validation split for model selection, and
the test split. Batches come out of `Task.loader(...)` as `Batch` objects already on the
model's device, augmented and normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch


@dataclass
class Batch:
    """One mini-batch, on the training device.

    x:       float [B, C, H, W], augmented (train only) and normalised
    y:       int64 [B], the labels a method may use (noisy for `train`, clean for `clean`)
    index:   int64 [B], position of each example inside its split (0 .. len(split)-1); methods
             with per-example state (weights) index it with this
    y_true:  int64 [B] or None: the original label, for analysis only (never for training)
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    y_true: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Split:
    """One split held in memory (`images` uint8 [N, C, H, W]) or streamed (`images` None and
    `source` an object the loader knows how to stream, e.g. Clothing1M).

    labels:       int64 [N], what methods see (noisy labels for the training split)
    true_labels:  int64 [N], the original labels (analysis only; equal to `labels` for clean splits)
    source_index: int64 [N], index of each example in the dataset's original split (audit trail)
    """

    labels: torch.Tensor
    true_labels: torch.Tensor
    source_index: torch.Tensor
    images: Optional[torch.Tensor] = None
    source: Any = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_noisy(self) -> torch.Tensor:
        """bool [N]: label differs from the original label."""
        return self.labels != self.true_labels


@dataclass
class Task:
    """A dataset with a noise model applied and the trusted/validation splits drawn.

    Built by `nrcore.data.build_task`. `train` is the noisy training set and never shares an
    example with `clean` or `val` (see the spec). `clean` is None when no trusted set was asked
    for; `val` is None without `--val-size`.
    """

    dataset: str
    num_classes: int
    input_shape: tuple  # (C, H, W)
    train: Split
    test: Split
    clean: Optional[Split] = None
    val: Optional[Split] = None
    noise: Any = None  # nrcore.data.NoiseSpec
    noise_rate_nominal: Optional[float] = None
    noise_rate_realized: float = 0.0
    transition_matrix: Optional[torch.Tensor] = None  # [C, C] float64, T[c, c'] = P(noisy c' | true c)
    class_names: Optional[list] = None
    info: dict = field(default_factory=dict)  # sizes, seeds, choices: copied into summary.json

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
    ) -> "BatchLoader":
        """Batches of split `split` ("train", "clean", "val" or "test")."""
        raise NotImplementedError  # provided by nrcore.data.loader


class BatchLoader:
    """Iterable of `Batch`; `len()` is the number of batches per pass."""

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError
