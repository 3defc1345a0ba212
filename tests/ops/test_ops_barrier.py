"""Barrier ops vs a per-tensor float64 loop (and vs the twin), flags, fused-list edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from nrcore import ops
from nrcore.ops import reference as ref

SHAPE_LISTS = {
    "one": [(5,)],
    "resnet-ish": [(16, 3, 3, 3), (16,), (16,), (32, 16, 3, 3), (32,), (10, 64), (10,)],
    "many-small": [(3,)] * 120,  # more tensors than one CUDA launch holds
    "big": [(70000,), (300, 700), (1,)],  # several chunks / threads per tensor
}


def loop64(f, q, a):
    """The definition, one tensor at a time with math.fsum in float64."""
    dot = math.fsum(float(x) * float(y) for fi, qi in zip(f, q) for x, y in zip(fi.double().flatten().tolist(), qi.double().flatten().tolist()))
    sq_w = math.fsum(float(y) ** 2 for qi in q for y in qi.double().flatten().tolist())
    sq_a = math.fsum(float(y) ** 2 for ai in a for y in ai.double().flatten().tolist())
    return torch.tensor([dot, sq_w, sq_a, 0.0], dtype=torch.float64)


def tensors(shapes, gen, device, dtype, layout, relayout):
    return [relayout(torch.randn(*s, generator=gen).to(device=device, dtype=dtype), layout) for s in shapes]


@pytest.mark.parametrize("lists", SHAPE_LISTS, ids=list(SHAPE_LISTS))
def test_barrier_stats_matches_float64_loop(device, dtype, layout, relayout, gen, lists):
    shapes = SHAPE_LISTS[lists]
    f = tensors(shapes, gen, device, dtype, layout, relayout)
    q = tensors(shapes, gen, device, dtype, layout, relayout)
    a = tensors(shapes[::-1][:4], gen, device, dtype, layout, relayout)
    stats = ops.barrier_stats(f, q, a)
    assert stats.dtype == torch.float64 and stats.shape == (4,) and stats.device.type == device
    want = loop64(f, q, a) if lists != "big" else ref.barrier_stats([t.cpu() for t in f], [t.cpu() for t in q], [t.cpu() for t in a])
    # inputs are exact in float64, so only the summation order differs
    torch.testing.assert_close(stats.cpu(), want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.cpu(), ref.barrier_stats(f, q, a).cpu(), rtol=1e-12, atol=1e-9)


def test_barrier_stats_mixed_list_dtypes_and_layouts(gen):
    f = [torch.randn(4, 6, generator=gen).t(), torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)]
    q = [torch.randn(6, 4, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)]  # layouts differ from f's
    a = [torch.randn(9, generator=gen, dtype=torch.float64)[::3]]  # float64 alpha, non-dense
    torch.testing.assert_close(ops.barrier_stats(f, q, a), loop64(f, q, a), rtol=1e-12, atol=1e-12)


def test_barrier_stats_accumulates_beyond_input_precision():
    """Terms a float32 accumulator would drop are kept (float64 accumulation of exact products)."""
    q = [torch.ones(1 << 20, dtype=torch.float32) * 1e-4]
    f = [torch.ones(1 << 20, dtype=torch.float32)]
    f[0][0] = 1e8
    stats = ops.barrier_stats(f, q, [torch.zeros(1)])
    exact = float(torch.tensor(1e-4, dtype=torch.float32).double()) * (1e8 + (1 << 20) - 1)
    assert stats[0].item() == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("where", ["f", "q", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_barrier_stats_flags_non_finite(device, where, value):
    f, q, a = [torch.ones(5, device=device)], [torch.zeros(5, device=device)], [torch.ones(3, device=device)]
    {"f": f, "q": q, "alpha": a}[where][0][2] = value
    stats = ops.barrier_stats(f, q, a)
    assert stats[3].item() == 1.0
    assert ops.barrier_coefficient(stats, 0.25).item() == 0.0


@pytest.mark.parametrize(
    "dot,sq_w,sq_a,delta,want",
    [
        (1.0, 2.0, 2.0, 0.5, 0.25),
        (3.0, 2.0, 2.0, 0.5, 0.0),  # clamped at 0
        (-4.0, 1.0, 1.0, 0.25, 2.25),
        (1.0, 0.0, 0.0, 0.25, 0.0),  # zero denominator
    ],
)
def test_barrier_coefficient(device, dot, sq_w, sq_a, delta, want):
    stats = torch.tensor([dot, sq_w, sq_a, 0.0], dtype=torch.float64, device=device)
    coef = ops.barrier_coefficient(stats, delta)
    assert coef.shape == () and coef.dtype == torch.float64 and coef.device.type == device
    assert coef.item() == pytest.approx(want)
    assert ref.barrier_coefficient(stats, delta).item() == pytest.approx(want)


@pytest.mark.parametrize("lists", ["resnet-ish", "many-small", "big"])
@pytest.mark.parametrize("coef_kind", ["float", "tensor"])
@pytest.mark.parametrize("with_f", [True, False])
def test_barrier_combine_matches_loop(device, dtype, layout, relayout, check_close, gen, lists, coef_kind, with_f):
    shapes = SHAPE_LISTS[lists]
    f = tensors(shapes, gen, device, dtype, layout, relayout)
    q = tensors(shapes, gen, device, dtype, layout, relayout)
    outs = [torch.full_like(t, 7.0) for t in q]
    coef = 0.37 if coef_kind == "float" else torch.tensor(0.37, dtype=torch.float64, device=device)
    ret = ops.barrier_combine_(outs, f if with_f else None, q, coef)
    assert all(r is o for r, o in zip(ret, outs))
    for k, (o, qi) in enumerate(zip(outs, q)):
        want = 0.37 * qi.double() + (f[k].double() if with_f else 0)
        check_close(o, want, dtype)


def test_barrier_combine_in_place_on_grads_f(gen):
    f = [torch.randn(4, 5, generator=gen), torch.randn(3, generator=gen)]
    q = [torch.randn(4, 5, generator=gen), torch.randn(3, generator=gen)]
    want = [fi + 0.5 * qi for fi, qi in zip(f, q)]
    ops.barrier_combine_(f, f, q, torch.tensor(0.5, dtype=torch.float64))
    for fi, wi in zip(f, want):
        torch.testing.assert_close(fi, wi)


def test_barrier_combine_non_finite_raises_naming_the_list():
    f, q = [torch.ones(3)], [torch.ones(3)]
    q[0][1] = float("nan")
    with pytest.raises(ValueError, match=r"barrier_combine_: grads_q\[0\] contains non-finite"):
        ops.barrier_combine_([torch.empty(3)], f, q, 1.0)
    with pytest.raises(ValueError, match=r"grads_f\[0\] contains non-finite"):
        ops.barrier_combine_([torch.empty(3)], [torch.tensor([1.0, float("inf"), 0.0])], [torch.ones(3)], 1.0)


def test_ebomlc_step_composition(gen):
    """The three ops compose into Algorithm 2 lines 8-9 exactly as the per-tensor formulas do."""
    shapes = SHAPE_LISTS["resnet-ish"]
    gF = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    gQ = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    gQa = [torch.randn(7, generator=gen, dtype=torch.float64)]
    delta, xi = 0.25, 0.5
    stats = ops.barrier_stats(gF, gQ, gQa)
    beta = ops.barrier_coefficient(stats, delta)
    outs = [torch.empty_like(t) for t in gF]
    ops.barrier_combine_(outs, gF, gQ, xi * beta)
    dot = sum(float((a * b).sum()) for a, b in zip(gF, gQ))
    sq = sum(float((b * b).sum()) for b in gQ) + float((gQa[0] ** 2).sum())
    beta_ref = max(delta - dot / sq, 0.0)
    assert beta.item() == pytest.approx(beta_ref, rel=1e-12)
    for o, a, b in zip(outs, gF, gQ):
        torch.testing.assert_close(o, a + xi * beta_ref * b)


@pytest.mark.filterwarnings("ignore:nrcore._C is not available:RuntimeWarning")
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_barrier_combine_skip_if_leaves_outs_untouched_and_reports_nothing(device, gen, monkeypatch, backend):
    """A flagged step (non-finite gradients a method will skip) writes nothing and raises nothing;
    an unflagged one is the ordinary combine."""
    if backend == "reference":
        from nrcore.ops import _backend

        monkeypatch.setattr(_backend, "_C", None)
        monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("hidden for the test"))
        assert ops.backend() == "reference"
    f = [torch.randn(4, 5, generator=gen).to(device), torch.randn(3, generator=gen).to(device)]
    q = [t.clone() for t in f]
    q[1][0] = float("nan")
    outs = [torch.full_like(t, 7.0) for t in q]
    ops.barrier_combine_(outs, f, q, 0.5, skip_if=torch.tensor(True, device=device))
    ops.check_errors()
    assert all(torch.equal(o, torch.full_like(o, 7.0)) for o in outs)
    q[1][0] = 1.0
    ops.barrier_combine_(outs, f, q, 0.5, skip_if=torch.tensor(0.0, device=device))
    for o, fi, qi in zip(outs, f, q):
        torch.testing.assert_close(o, fi + 0.5 * qi)


def test_barrier_combine_skip_if_must_sit_with_outs():
    with pytest.raises(TypeError, match="skip_if must be a one-element tensor"):
        ops.barrier_combine_([torch.empty(3)], None, [torch.ones(3)], 1.0, skip_if=True)
    with pytest.raises(TypeError, match="skip_if"):
        ops.barrier_combine_([torch.empty(3)], None, [torch.ones(3)], 1.0, skip_if=torch.zeros(2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="skip_if is on cuda"):
            ops.barrier_combine_([torch.empty(3)], None, [torch.ones(3)], 1.0, skip_if=torch.zeros((), device="cuda"))


def test_barrier_combine_skip_if_through_the_registered_op():
    """The custom op's schema and fake kernel carry skip_if (torch.compile path)."""
    outs = [torch.full((3,), 7.0)]
    torch.ops.nrcore.barrier_combine_(outs, [], [torch.ones(3)], None, 2.0, torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(outs[0], torch.full((3,), 7.0))
    torch.ops.nrcore.barrier_combine_(outs, [], [torch.ones(3)], None, 2.0, None)
    assert torch.equal(outs[0], torch.full((3,), 2.0))
