"""Models that need torchvision (an optional extra: imported only when asked for)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from nrcore.models.resnet import _Backbone


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # PyPI torchvision can fail to import against a CPU torch
        raise RuntimeError(
            f"model 'resnet50' needs torchvision, which could not be imported ({exc.__class__.__name__}: {exc}); "
            "install a torchvision build matching your torch (pip install 'nrcore[vision]')"
        ) from exc
    return torchvision


class _TorchvisionResNet(_Backbone):
    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x):
        return self.net(x)


def resnet50(num_classes: int) -> nn.Module:
    """torchvision ResNet-50 with a new classifier. ImageNet weights are loaded when a local
    copy exists ($NRCORE_RESNET50_WEIGHTS, or torchvision's cache); nothing is downloaded."""
    tv = _import_torchvision()
    net = tv.models.resnet50(weights=None)
    candidates = [os.environ.get("NRCORE_RESNET50_WEIGHTS", "")]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    candidates += [str(p) for p in sorted(hub.glob("resnet50-*.pth"))] if hub.is_dir() else []
    for path in candidates:
        if path and Path(path).is_file():
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            break
    return _TorchvisionResNet(net, num_classes)
