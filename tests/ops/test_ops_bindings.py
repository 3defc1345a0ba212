"""The compiled bindings take each kernel's argument struct by field name: the keywords the
Python ops pass are exactly the fields of the struct in include/nrcore/kernels.h (so no argument
can be swapped, dropped or left at zero), and a wrong or missing keyword is an error naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nrcore import ops
from nrcore.ops import _backend

KERNELS_H = Path(__file__).resolve().parents[2] / "include" / "nrcore" / "kernels.h"

# binding -> its argument struct; fields the binding derives itself (list lengths)
STRUCTS = {
    "fbr_prepare": ("FbrPrepareArgs", set()),
    "fbr_direction": ("FbrDirectionArgs", set()),
    "fbr_update": ("FbrUpdateArgs", set()),
    "tangent_dot": ("TangentDotArgs", set()),
    "tangent_kernel": ("TangentKernelArgs", set()),
    "conv_tangent_dot": ("ConvTangentDotArgs", set()),
    "conv_tangent_kernel": ("ConvTangentKernelArgs", set()),
    "barrier_stats": ("BarrierStatsArgs", {"num_pairs", "num_alpha"}),
    "barrier_combine": ("BarrierCombineArgs", {"num"}),
}


def struct_fields(name: str) -> set:
    """Field names of `struct name { ... };` in kernels.h (comments stripped)."""
    text = re.sub(r"//[^\n]*", "", KERNELS_H.read_text())
    body = re.search(rf"struct {name} \{{(.*?)\}};", text, re.S)
    assert body, f"struct {name} not found in {KERNELS_H}"
    fields = set()
    for declaration in body.group(1).split(";"):
        declaration = declaration.strip()
        if not declaration:
            continue
        names = declaration.split(",")
        names[0] = re.split(r"[\s*]+", names[0].strip())[-1]  # the type precedes the first name
        fields |= {n.strip() for n in names}
    return fields


class Recorder:
    """Stands in for nrcore._C: records each kernel call's keywords, then runs it."""

    def __init__(self, real):
        self.real, self.calls = real, {}

    def __getattr__(self, name):
        target = getattr(self.real, name)
        if name not in STRUCTS:
            return target

        def call(*args, **kwargs):
            self.calls[name] = kwargs
            return target(*args, **kwargs)

        return call


def _run_every_op():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    stats = ops.fbr_prepare(r(12, 3), torch.arange(12) % 3, 3)
    d = ops.fbr_direction(r(4, 3), torch.arange(4) % 3, stats)
    ops.fbr_update_(torch.full((6,), 0.5), torch.arange(4), d, 0.1)
    ops.tangent_dot(r(2, 3, 5), r(2, 3, 4), r(2, 4, 5))
    ops.tangent_kernel(r(2, 3, 5), r(2, 3, 4), r(3, 1, 5), r(3, 1, 4))
    from nrcore.ops.tangent import _conv_tangent_dot_impl, _conv_tangent_kernel_impl

    x, grads = r(2, 2, 5, 5), r(2, 3, 5, 5)
    _conv_tangent_dot_impl(x, grads, r(4, 3, 18), [3, 3], [1, 1], [1, 1], [1, 1], 2)
    _conv_tangent_kernel_impl(x, grads, x, grads, [3, 3], [1, 1], [1, 1], [1, 1], 2)
    s = ops.barrier_stats([r(3), r(2)], [r(3), r(2)], [r(4)])
    ops.barrier_combine_([r(3), r(2)], [r(3), r(2)], [r(3), r(2)], ops.barrier_coefficient(s, 0.1))


@pytest.fixture
def recorded(monkeypatch):
    if ops.backend() != "compiled":
        pytest.skip("no compiled module")
    recorder = Recorder(_backend._C)
    monkeypatch.setattr(_backend, "_C", recorder)
    _run_every_op()
    return recorder.calls


@pytest.mark.parametrize("binding", sorted(STRUCTS))
def test_the_keywords_are_exactly_the_fields_of_the_struct(recorded, binding):
    struct, derived = STRUCTS[binding]
    assert binding in recorded, f"{binding} was not called"
    assert set(recorded[binding]) == struct_fields(struct) - derived
    for key, value in recorded[binding].items():
        if key.startswith("geom"):  # a ConvGeometry, itself by field name
            assert set(value) == struct_fields("ConvGeometry")


def test_the_struct_parser_reads_every_declaration_form():
    assert {"m", "d", "num_classes", "feats_rs", "feats_cs", "sq_norm_mean"} <= struct_fields("FbrPrepareArgs")
    assert {"f", "q", "pair_numel", "alpha_numel", "out"} <= struct_fields("BarrierStatsArgs")
    assert len(struct_fields("ConvGeometry")) == 17


def test_a_wrong_or_missing_keyword_is_an_error_naming_it():
    if ops.backend() != "compiled":
        pytest.skip("no compiled module")
    C = _backend._C
    good = dict(dtype=0, n=3, batch=0, weights=0, weights_s=1, index=0, index_s=1, direction=0, direction_s=1, step_size=0.1, nthreads=1)
    assert C.fbr_update(-1, 0, **good) == 0  # an empty batch: nothing read or written
    with pytest.raises(TypeError, match="fbr_update: missing keyword argument 'step_size'"):
        C.fbr_update(-1, 0, **{k: v for k, v in good.items() if k != "step_size"})
    with pytest.raises(TypeError, match="fbr_update: unexpected keyword argument 'step'"):
        C.fbr_update(-1, 0, step=0.1, **good)
