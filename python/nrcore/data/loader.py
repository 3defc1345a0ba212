"""Batching: `Task.loader(...)` builds one of these.

In-memory splits (everything but Clothing1M) keep uint8 images in one tensor, copied once to the
device; a batch is an index_select, the augmentation (one gather that crops and flips the whole
batch) and one fused normalisation, all on the device. The random order and the augmentation
draws come from the caller's CPU generator, so a seed reproduces every batch. Streamed splits
decode image files in DataLoader workers and then go through the same batched steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F


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
    # under torchrun (nrcore.parallel): this rank's slice of a global batch of `whole_size`
    # examples, starting at position `offset` of it; None: the batch is whole
    whole_size: Optional[int] = None
    offset: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def total(self) -> int:
        """The size of the global batch this is (a slice of): what per-batch means divide by."""
        return len(self) if self.whole_size is None else self.whole_size


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation, run batched on the device: zero-pad by `pad`, take a random
    `crop` x `crop` window, flip horizontally with prob. 1/2 when `flip`. Images stored larger
    than `crop` (Clothing1M: 256) are centre-cropped when not augmenting."""

    pad: int
    crop: int
    flip: bool

    def __str__(self) -> str:
        parts = [f"random crop {self.crop}" + (f" after {self.pad}-pixel zero padding" if self.pad else "")]
        return ", ".join(parts + (["horizontal flip"] if self.flip else []))


class BatchLoader:
    """Iterable of `Batch`; `len()` is the number of batches per pass."""

    def __iter__(self) -> Iterator[Batch]:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError



class _BatchTransform:
    """uint8 [B, C, S, S] on the device -> normalised float [B, C, out, out]: random crop/flip
    when augmenting, centre crop when the stored size exceeds the model's input size."""

    def __init__(self, task, device: torch.device):  # task: a nrcore.data.types.Task
        mean = torch.tensor(task.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(task.std, dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add; built on the host and copied without a
        # sync, since a method's step may make one (Task.batch)
        nb = torch.device(device).type == "cuda"
        self.scale = (1.0 / (255.0 * std)).to(device, non_blocking=nb)
        self.shift = (-mean / std).to(device, non_blocking=nb)
        self.augmentation: Optional[Augmentation] = task.augmentation
        self.out_size = int(task.input_shape[-1])
        self.device = device

    def __call__(self, x: torch.Tensor, augment: bool, generator: Optional[torch.Generator], *, offset: int = 0,
                 whole_size: Optional[int] = None) -> torch.Tensor:
        """`whole_size`: `x` holds rows `offset ...` of a batch of that many, for which the
        augmentation is drawn (under torchrun a rank's slice draws what the whole batch would,
        so every rank's generator stays in step, and keeps its rows)."""
        aug = self.augmentation
        if augment and aug is not None:
            offsets, flips = self._draw(aug, whole_size or x.shape[0], x.shape[-1], generator)
            rows = slice(offset, offset + x.shape[0])
            nb = self.device.type == "cuda"  # no host-device sync for the draws' copy
            x = crop_and_flip(x, offsets[:, rows].to(self.device, non_blocking=nb), flips[rows].to(self.device, non_blocking=nb), aug.pad, aug.crop)
        elif x.shape[-1] != self.out_size:
            start = (x.shape[-1] - self.out_size) // 2
            x = x[:, :, start : start + self.out_size, start : start + self.out_size]
        return torch.addcmul(self.shift, x.float(), self.scale)

    @staticmethod
    def _draw(aug: Augmentation, batch: int, size: int, generator: Optional[torch.Generator]):
        """(offsets [2, batch], flips [batch]) on the CPU generator, so a batch depends only on
        (seed, epoch), whatever the device."""
        span = size + 2 * aug.pad - aug.crop
        offsets = torch.randint(0, span + 1, (2, batch), generator=generator)
        flips = (torch.rand(batch, generator=generator) < 0.5) if aug.flip else torch.zeros(batch, dtype=torch.bool)
        return offsets, flips


def crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int, crop: int) -> torch.Tensor:
    """Batched crop-and-flip: image i of x [B, C, S, S] zero-padded by `pad` on every side, the
    `crop` x `crop` window whose top-left corner is (offsets[0, i], offsets[1, i]) in the padded
    image, mirrored left-right where flips[i]. One gather for the whole batch, on x's device."""
    batch, channels = x.shape[0], x.shape[1]
    if pad:
        x = F.pad(x, (pad,) * 4)
    padded = x.shape[-1]
    ramp = torch.arange(crop, device=x.device)
    rows = offsets[0, :, None] + ramp
    cols = offsets[1, :, None] + torch.where(flips[:, None], crop - 1 - ramp, ramp)
    # one gather over the flattened pixels picks every crop (and mirrors the flipped ones)
    pixel = (rows[:, :, None] * padded + cols[:, None, :]).view(batch, 1, -1).expand(-1, channels, -1)
    return torch.gather(x.reshape(batch, channels, -1), 2, pixel).view(batch, channels, crop, crop)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


class _SplitLoader(BatchLoader):
    """`ranks` (a nrcore.parallel.Ranks under torchrun): every rank draws the same global
    batches and keeps its slice of each (`Ranks.slice_bounds`); only its rows are read, decoded
    and augmented."""

    def __init__(self, task, split, batch_size, *, shuffle, augment, drop_last, generator, device, ranks=None):
        self.split = split  # nrcore.data.types.Split
        self.batch_size = _check_batch_size(batch_size)
        self.shuffle, self.augment, self.drop_last = bool(shuffle), bool(augment), bool(drop_last)
        self.generator = generator
        self.device = torch.device(device)
        self.transform = _BatchTransform(task, self.device)
        self.ranks = ranks if ranks is not None and ranks.distributed else None

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> Optional[torch.Tensor]:
        return torch.randperm(len(self.split), generator=self.generator) if self.shuffle else None

    def _index_batches(self, order: Optional[torch.Tensor]) -> Iterator[Tuple[torch.Tensor, int, Optional[int]]]:
        """(this rank's rows of the global batch, where they start in it, the global batch's size
        or None when the batch is whole)."""
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(self.split))
            index = torch.arange(lo, hi) if order is None else order[lo:hi]
            if self.ranks is None:
                yield index, 0, None
            else:
                start, stop = self.ranks.slice_bounds(len(index))
                yield index[start:stop], start, len(index)

    def _batch(self, x_uint8: torch.Tensor, index: torch.Tensor, offset: int = 0, whole_size: Optional[int] = None) -> Batch:
        nb = self.device.type == "cuda"
        return Batch(
            x=self.transform(x_uint8, self.augment, self.generator, offset=offset, whole_size=whole_size),
            y=self.split.labels[index].to(self.device, non_blocking=nb),
            index=index.to(self.device, non_blocking=nb),
            y_true=self.split.true_labels[index].to(self.device, non_blocking=nb),
            whole_size=whole_size,
            offset=offset,
        )


class InMemoryLoader(_SplitLoader):
    """Batches of a split whose uint8 images are in memory."""

    def __iter__(self) -> Iterator[Batch]:
        images = self.split.images_on(self.device)
        order = self._order()
        for index, offset, whole_size in self._index_batches(order):
            if order is None and len(index):  # a contiguous slice: no copy
                x = images[int(index[0]) : int(index[-1]) + 1]
            else:
                x = images.index_select(0, index.to(self.device))
            yield self._batch(x, index, offset, whole_size)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source[i]


class StreamingLoader(_SplitLoader):
    """Batches of a split decoded from files by DataLoader workers (Clothing1M)."""

    def __init__(self, *args, num_workers: Optional[int], **kwargs):
        super().__init__(*args, **kwargs)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[Batch]:
        # a rank's empty slice of a short last batch (evaluation only: training batches give every
        # rank an example) decodes nothing and yields nothing
        batches = [b for b in self._index_batches(self._order()) if len(b[0])]
        decoded = torch.utils.data.DataLoader(
            _Decoded(self.split.source),
            batch_sampler=[index.tolist() for index, _, _ in batches],
            num_workers=self.num_workers,
            collate_fn=torch.stack,
            pin_memory=self.device.type == "cuda",
        )
        for (index, offset, whole_size), x in zip(batches, decoded):
            yield self._batch(x.to(self.device, non_blocking=True), index, offset, whole_size)


def make_loader(task, split, batch_size: int, *, shuffle, augment, drop_last, generator, device, num_workers, ranks=None) -> BatchLoader:
    """Batches of `split` (a nrcore.data.types.Split of `task`, a Task): what Task.loader returns.
    Tasks and splits are only read here (mean/std, augmentation, images), never imported, so this
    module sits below types.py."""
    options = dict(shuffle=shuffle, augment=augment, drop_last=drop_last, generator=generator, device=device, ranks=ranks)
    if split.images is not None:
        return InMemoryLoader(task, split, batch_size, **options)
    if split.source is not None:
        return StreamingLoader(task, split, batch_size, num_workers=num_workers, **options)
    raise ValueError("split has neither in-memory images nor a source to stream from")
