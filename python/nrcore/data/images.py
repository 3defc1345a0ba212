"""Image files decoded with Pillow: lazily for streamed datasets (Clothing1M), eagerly for a
custom CSV. Pillow is imported only here, only when such a dataset is used."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from nrcore.data.errors import DataError


def _pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("decoding image files (clothing1m, custom CSV) needs Pillow: pip install pillow") from None
    return Image


def decode_image(path: Path, mode: str, size: Optional[int] = None) -> np.ndarray:
    """uint8 [C, H, W] of one image file in PIL `mode` ("L" or "RGB"), resized to size x size
    (bilinear) when `size` is given."""
    Image = _pil_image()
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            array = np.array(img, dtype=np.uint8)  # a writable copy, for torch
    except OSError as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_mode(path: Path) -> str:
    """"L" for a single-channel image file, "RGB" otherwise."""
    Image = _pil_image()
    try:
        with Image.open(path) as img:
            return "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    except OSError as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


class ImageFiles:
    """A list of image files under `root`, decoded on demand to uint8 [3, size, size]."""

    def __init__(self, root: Path, keys: Sequence[str], size: int):
        self.root = Path(root)
        self.keys: List[str] = list(keys)
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices: np.ndarray) -> "ImageFiles":
        return ImageFiles(self.root, [self.keys[i] for i in indices], self.size)

    def concat(self, other: "ImageFiles") -> "ImageFiles":
        if other.root != self.root or other.size != self.size:
            raise ValueError("can only concatenate image lists with the same root and size")
        return ImageFiles(self.root, self.keys + other.keys, self.size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_image(self.root / self.keys[i], "RGB", self.size))
