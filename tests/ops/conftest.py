"""Shared parametrisation and helpers for the nrcore.ops tests.

A test that takes `device` runs on the CPU and on CUDA (the CUDA variant is marked `cuda` and
skipped without a GPU); one that also takes `dtype` runs over the dtypes that device supports;
`layout` runs over contiguous, transposed and strided copies of its inputs (see `relayout`).
Helpers come as fixtures: `check_close`, `relayout`, `gen` (a seeded torch.Generator).
"""

from __future__ import annotations

import pytest
import torch

LAYOUTS = ("contiguous", "transposed", "strided")


def _device_param(device: str, *rest, id_suffix: str = ""):
    marks = []
    if device == "cuda":
        marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    values = (device, *rest)
    return pytest.param(*values, marks=marks, id=device + id_suffix)


def dtypes_for(device: str):
    return [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if device == "cuda" else [])


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "device" in names and "dtype" in names:
        params = [
            _device_param(dev, dt, id_suffix="-" + str(dt).replace("torch.", ""))
            for dev in ("cpu", "cuda")
            for dt in dtypes_for(dev)
        ]
        metafunc.parametrize("device,dtype", params)
    elif "device" in names:
        metafunc.parametrize("device", [_device_param(dev) for dev in ("cpu", "cuda")])
    if "layout" in names:
        metafunc.parametrize("layout", LAYOUTS)


TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (3e-2, 3e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def _check_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=None) -> None:
    """Compare within the input dtype's tolerance, relative to the magnitude of `expected` (or of
    `scale`, e.g. the size of the terms of a cancelling sum)."""
    rtol, atol = TOLERANCE[dtype]
    expected = expected.to(device=actual.device, dtype=actual.dtype)
    size = float(expected.abs().max()) if expected.numel() else 0.0
    size = max(size, float(scale) if scale is not None else 0.0, 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * size)


def _relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: 'contiguous'; 'transposed' (the last two dims
    stored column-major; a 1-D tensor is left alone); 'strided' (every other element of a wider
    buffer along the last dim)."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if kind == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(kind)


@pytest.fixture
def check_close():
    return _check_close


@pytest.fixture
def relayout():
    return _relayout


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
