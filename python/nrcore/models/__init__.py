"""Backbones used by the papers, all with one interface:

    logits = model(x)
    logits, feats = model(x, return_features=True)   # penultimate features, same forward
    model.classifier                                  # the final nn.Linear (feats -> logits)
    model.feature_dim                                 # width of feats

`build_model(name, input_shape, num_classes)` makes one by name; `MODELS` lists the names.
`resolve_channels_last(setting, device)` says whether a run keeps its weights (and so its
activations) in channels-last layout.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from nrcore.models.resnet import PreActResNet18, ResNet8, ResNet32, ResNet34
from nrcore.models.small import CNN, MLP

__all__ = ["MODELS", "build_model", "describe_models", "resolve_channels_last", "CNN", "MLP", "ResNet8", "ResNet32", "ResNet34", "PreActResNet18"]


def _resnet50(input_shape, num_classes):
    from nrcore.models.torchvision_models import resnet50

    return resnet50(num_classes)


_BUILDERS: Dict[str, Tuple[Callable[..., nn.Module], str]] = {
    "resnet32": (lambda s, c: ResNet32(s[0], c), "CIFAR ResNet-32 (3x5 basic blocks, 16/32/64, option-A shortcuts): EBOMLC/MLC backbone"),
    "resnet8": (lambda s, c: ResNet8(s[0], c), "CIFAR ResNet-8 (3x1 basic blocks, 16/32/64, option-A shortcuts): the cifar10n-cpu protocol's fast CPU model"),
    "resnet34": (lambda s, c: ResNet34(s[0], c), "ResNet-34, CIFAR variant (3x3 stem, no max-pool): FBR backbone"),
    "preact-resnet18": (lambda s, c: PreActResNet18(s[0], c), "pre-activation ResNet-18 (CIFAR variant)"),
    "cnn": (lambda s, c: CNN(s, c), "small 3-conv CNN for 28x28 and 8x8 inputs (fast CPU benchmark model)"),
    "mlp": (lambda s, c: MLP(s, c), "2-hidden-layer MLP on flattened inputs"),
    "resnet50": (_resnet50, "torchvision ResNet-50 for Clothing1M (needs torchvision; ImageNet weights if cached)"),
}

MODELS = tuple(_BUILDERS)


def build_model(name: str, input_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised model (uses the global torch RNG)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _BUILDERS[name][0](tuple(input_shape), num_classes)


def describe_models() -> Dict[str, str]:
    return {name: desc for name, (_, desc) in _BUILDERS.items()}


def resolve_channels_last(setting: Optional[bool], device: torch.device, method_suits: bool = True) -> bool:
    """`--channels-last` resolved: None (auto) means on for CPU runs of methods that suit it
    (`Method.suits_channels_last(options)`, passed as `method_suits`), off otherwise and on CUDA.

    Why on the CPU: with 4-d weights in channels-last layout, oneDNN runs the convolutions,
    BatchNorm and above all max-pooling in NHWC, where torch's NCHW max-pooling is several times
    slower: a `ce` step of the `cnn` on mnist10k takes 0.7x the time, a ResNet-32 step about
    0.7x, and most methods gain. Steps that are mostly double backprop through BatchNorm (`mlc`,
    `--hypergrad autograd`) lose: their decomposed reductions are slower in NHWC
    (bench/README.md, "Memory layout"). The values are the same up to float rounding. CUDA keeps
    the default layout because it has not been measured there. Models without 4-d weights (the
    MLP) are unaffected either way."""
    if setting is not None:
        return bool(setting)
    return torch.device(device).type == "cpu" and method_suits
