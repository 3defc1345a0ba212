"""Model zoo: sizes from the papers, the shared (logits, features) interface."""

import pytest
import torch

from nrcore.models import MODELS, build_model

SHAPES = {"resnet8": (3, 32, 32), "resnet32": (3, 32, 32), "resnet34": (3, 32, 32), "preact-resnet18": (3, 32, 32), "cnn": (1, 28, 28), "mlp": (1, 8, 8)}


def test_resnet32_is_the_046m_parameter_cifar_resnet():
    model = build_model("resnet32", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 464_154
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages x 5 blocks x 2 (option-A shortcuts have no conv)


def test_resnet34_size():
    model = build_model("resnet34", (3, 32, 32), 10)
    assert 21.2e6 < sum(p.numel() for p in model.parameters()) < 21.4e6


@pytest.mark.parametrize("name", list(SHAPES))
def test_features_come_from_the_same_forward(name):
    torch.manual_seed(0)
    model = build_model(name, SHAPES[name], 7).eval()
    x = torch.randn(3, *SHAPES[name])
    logits, feats = model(x, return_features=True)
    assert logits.shape == (3, 7) and feats.shape == (3, model.feature_dim)
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(model.classifier(feats), logits)


def test_cnn_handles_8x8_digits():
    model = build_model("cnn", (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", (1, 28, 28), 1)
    assert set(SHAPES) | {"resnet50"} == set(MODELS)


def test_channels_last_is_on_for_cpu_runs_unless_set():
    from nrcore.models import resolve_channels_last

    assert resolve_channels_last(None, torch.device("cpu")) is True
    assert resolve_channels_last(None, torch.device("cuda")) is False  # not measured there: default layout
    assert resolve_channels_last(False, torch.device("cpu")) is False
    assert resolve_channels_last(True, "cuda:1") is True
