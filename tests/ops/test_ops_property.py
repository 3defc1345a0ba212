"""Property tests: random shapes, dtypes, layouts and values (NaN/inf and out-of-range labels
included) thrown at every op. Each call either matches the pure-PyTorch twin within tolerance or
raises a TypeError/ValueError that starts with the op's name, for a reason the input really has."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nrcore import ops
from nrcore.ops import reference as ref

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16])  # float16: autocast's outputs
# float16 inputs are accumulated in float32 (on the CPU: converted to float32 first), so they
# meet the float32 twin on the same values at float32's tolerance
TOL = {torch.float32: 2e-4, torch.float64: 1e-10, torch.float16: 2e-4}


def up(t):
    """What the kernels compute from: half-precision inputs as float32."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float16 else t


def draw_tensor(data, shape, dtype, *, specials=True):
    """Random values, sometimes with a NaN/inf planted, in a random memory layout."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if specials and t.numel() and data.draw(st.integers(0, 9)) == 0:
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    t = t.to(dtype)
    if t.dim() >= 2 and data.draw(st.booleans()):
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def finite(*tensors):
    return all(bool(torch.isfinite(t.double()).all()) for t in tensors if isinstance(t, torch.Tensor))


def outcome(op, call):
    """('ok', value) or ('error', exception) for an expected error type starting with the op."""
    try:
        return "ok", call()
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith(op + ":") or str(exc).startswith("nrcore"), f"unclear message: {exc}"
        return "error", exc


def close(actual, expected, dtype, scale):
    if actual.numel() == 0:
        return
    tol = TOL[dtype]
    size = max(float(expected.abs().max()), float(scale), 1.0)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol * size)


@SETTINGS
@given(data=st.data())
def test_fbr_ops_property(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))  # all randomness from hypothesis
    dtype = data.draw(DTYPES)
    m, d, B = data.draw(st.integers(0, 30)), data.draw(st.integers(1, 12)), data.draw(st.integers(0, 10))
    C = data.draw(st.integers(1, 6))
    clean = draw_tensor(data, (m, d), dtype)
    clean_labels = torch.randint(0, max(C, 1) + data.draw(st.sampled_from([0, 0, 0, 1])), (m,), generator=gen)
    kind, stats = outcome("fbr_prepare", lambda: ops.fbr_prepare(clean, clean_labels, C))
    bad_prepare = C < 2 or m == 0 or bool((clean_labels >= C).any()) or not finite(clean)
    assert (kind == "error") == bad_prepare, stats
    if kind == "error":
        return
    want_stats = ref.fbr_prepare(up(clean), clean_labels, C)
    close(stats.basis_t, want_stats.basis_t, dtype, 1.0)

    feats = draw_tensor(data, (B, d), dtype)
    labels = torch.randint(0, C + data.draw(st.sampled_from([0, 0, 0, 1])), (B,), generator=gen)
    kw = dict(row_shift=data.draw(st.booleans()), label_sign=data.draw(st.booleans()), normalize=data.draw(st.booleans()))
    kind, got = outcome("fbr_direction", lambda: ops.fbr_direction(feats, labels, stats, **kw))
    reasons = (kw["row_shift"] and stats.num_present < 2) or (kw["normalize"] and stats.sq_norm_mean == 0) or bool((labels >= C).any())
    if kind == "error":
        twin_bad = False
        if not reasons:
            twin_bad = not finite(ref.fbr_direction(up(feats), labels, want_stats, **kw))
        assert reasons or not finite(feats) or twin_bad, got
        return
    assert not reasons
    want = ref.fbr_direction(up(feats), labels, want_stats, **kw)
    assert finite(got)
    if not finite(want):  # non-finite feats that the chosen terms never use (e.g. d = 0 identically)
        assert not finite(feats)
        return
    close(got, want, dtype, 1.0 if kw["normalize"] else m * d * float(clean.abs().max().double() + 1) ** 2)

    n = B + data.draw(st.integers(0, 5))
    w = torch.rand(n, generator=gen, dtype=dtype if dtype != torch.float16 else torch.float32)
    index = torch.randperm(n, generator=gen)[:B]
    if B and data.draw(st.integers(0, 4)) == 0:
        index[0] = n  # out of range
    step = data.draw(st.floats(-1, 1))
    w_ref = w.clone()
    kind, res = outcome("fbr_update_", lambda: ops.fbr_update_(w, index, got, step))
    if kind == "error":
        assert bool((index >= n).any()), res
        return
    ref.fbr_update_(w_ref, index, got, step)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-6)


@SETTINGS
@given(data=st.data())
def test_tangent_ops_property(data):
    dtype = data.draw(DTYPES)
    B, T, p, q = (data.draw(st.integers(0, 8)), data.draw(st.integers(0, 6)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6)))
    M, S, k = data.draw(st.integers(0, 6)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4))
    strategy = data.draw(st.sampled_from(["auto", "ghost", "explicit"]))
    acts, grads = draw_tensor(data, (B, T, p), dtype), draw_tensor(data, (B, T, q), dtype)
    acts_b, grads_b = draw_tensor(data, (M, S, p), dtype), draw_tensor(data, (M, S, q), dtype)
    D = draw_tensor(data, (k, q, p), dtype)
    for op, call, twin, named in (
        ("tangent_dot", lambda: ops.tangent_dot(acts, grads, D, strategy=strategy), lambda: ref.tangent_dot(up(acts), up(grads), up(D)), (acts, grads, D)),
        ("tangent_kernel", lambda: ops.tangent_kernel(acts, grads, acts_b, grads_b, strategy=strategy),
         lambda: ref.tangent_kernel(up(acts), up(grads), up(acts_b), up(grads_b)), (acts, grads, acts_b, grads_b)),
    ):
        kind, got = outcome(op, call)
        if kind == "error":
            assert not finite(*named), got
            continue
        want = twin()
        assert finite(got)
        if not finite(want):  # a NaN that only an empty sum met (T = 0): the op's exact 0 stands
            assert not finite(*named) and T == 0
            continue
        scale = max(float(t.abs().max().double()) if t.numel() else 0.0 for t in named) ** 2 * (T * max(S, 1) * p * q + 1)
        close(got, want, dtype, scale)


@SETTINGS
@given(data=st.data())
def test_barrier_ops_property(data):
    dtype = data.draw(DTYPES)
    shapes = [tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))) for _ in range(data.draw(st.integers(0, 4)))]
    f = [draw_tensor(data, s, dtype) for s in shapes]
    q = [draw_tensor(data, s, dtype) for s in shapes]
    a = [draw_tensor(data, s, dtype) for s in shapes[:1] or [(3,)]]
    kind, stats = outcome("barrier_stats", lambda: ops.barrier_stats(f, q, a))
    if kind == "error":
        assert dtype == torch.float16 or not shapes, stats
        return
    want = ref.barrier_stats(f, q, a)
    assert stats[3].item() == (0.0 if finite(*f, *q, *a) else 1.0)
    if stats[3].item() == 0.0:
        close(stats[:3], want[:3], torch.float64, 1.0)
        delta = data.draw(st.floats(0, 2))
        coef = ops.barrier_coefficient(stats, delta)
        close(coef, ref.barrier_coefficient(want, delta), torch.float64, 1.0)
    else:
        assert ops.barrier_coefficient(stats, 0.5).item() == 0.0
    outs = [torch.empty_like(t) for t in q]
    coef = data.draw(st.floats(-2, 2))
    kind, res = outcome("barrier_combine_", lambda: ops.barrier_combine_(outs, f, q, coef))
    if kind == "error":
        assert not finite(*f, *q), res
        return
    for o, fi, qi in zip(outs, f, q):
        torch.testing.assert_close(o, (fi.double() + coef * qi.double()).to(dtype), rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10 * float(1 + fi.abs().max().double() + qi.abs().max().double()) if fi.numel() else 0)
