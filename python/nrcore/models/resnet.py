"""CIFAR-style residual networks.

ResNet32: He et al. 2016's CIFAR ResNet (6n+2 layers, n=5), widths 16/32/64 and "option A"
shortcuts (stride-2 subsampling plus zero-padded channels, no parameters): ~0.46M parameters,
the backbone of MLC and EBOMLC.
ResNet8: the same family with n=1 (one block per stage, ~75k parameters): the `cifar10n-cpu`
protocol's model, an epoch of 10,000 CIFAR images in about 12 s on 2 CPU cores.
ResNet34: the ImageNet ResNet-34 block layout [3, 4, 6, 3] with widths 64..512 and a 3x3 stride-1
stem without max-pool, as commonly used on CIFAR: ~21M parameters, the FBR paper's backbone.
PreActResNet18: He et al. 2016b pre-activation ResNet-18, CIFAR variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Backbone(nn.Module):
    """forward(x, return_features=False): logits, or (logits, penultimate features)."""

    feature_dim: int
    classifier: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.classifier(feats)
        return (logits, feats) if return_features else logits


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif option == "A":
            self.shortcut = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_Backbone):
    """He et al.'s CIFAR ResNet with `blocks_per_stage` = n basic blocks per stage (6n+2 layers)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks_per_stage: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks_per_stage):
                stage.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, option="A"))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class ResNet32(CifarResNet):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__(in_channels, num_classes, blocks_per_stage=5)


class ResNet8(CifarResNet):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__(in_channels, num_classes, blocks_per_stage=1)


class ResNet34(_Backbone):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for planes, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(n):
                stage.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, option="B"))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(_Backbone):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(_PreActBlock(in_planes, planes, stride), _PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)
        _kaiming_init(self)

    def features(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
