"""Small models for the fast CPU benchmarks (mnist10k, digits) and for tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nrcore.models.resnet import _Backbone


class CNN(_Backbone):
    """Three 3x3 conv layers (32, 64, 128 channels, BatchNorm, ReLU) with 2x2 max-pooling after
    the first two when the input is large enough (28x28: yes; 8x8: only the first), global
    average pooling and a linear classifier. Features: 128-d."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, widths=(32, 64, 128)):
        super().__init__()
        c, h, _ = input_shape
        layers, in_ch, size = [], c, h
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(widths) - 1 and size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            in_ch = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


class MLP(_Backbone):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(hidden) -> ReLU -> classifier."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, hidden: int = 256):
        super().__init__()
        in_features = int(math.prod(input_shape))
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        )
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
