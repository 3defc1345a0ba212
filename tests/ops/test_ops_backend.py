"""Back ends: the compiled module and its CPU ISA levels, the reference fallback (and
NRCORE_REQUIRE_COMPILED), custom-op registration (opcheck) and torch.compile tracing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nrcore import ops

OP_NAMES = [
    "fbr_prepare", "fbr_direction", "fbr_update_", "tangent_dot", "tangent_kernel", "conv_tangent_dot",
    "conv_tangent_kernel", "barrier_stats", "barrier_coefficient", "barrier_combine_",
]


def test_compiled_backend_is_active():
    import nrcore._C as C

    assert ops.backend() == "compiled" and ops.backend("cpu") == "compiled"
    assert C.cpu_isa() in ("base", "v3", "v4")
    assert ops.backend("cuda") == ("compiled" if C.has_cuda else "reference")
    for name in OP_NAMES:
        assert hasattr(torch.ops.nrcore, name), name


def workload():
    """One run through every op; {op: checksum} so back ends and ISA levels can be compared."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    clean, cl = r(60, 9) + 1, torch.arange(60) % 4
    st = ops.fbr_prepare(clean, cl, 4)
    feats, lab = r(21, 9), torch.arange(21) % 4
    d = ops.fbr_direction(feats, lab, st)
    w = torch.full((30,), 0.5, dtype=torch.float64)
    ops.fbr_update_(w, torch.arange(21), d, 0.01)
    out = dict(
        prep=st.basis_t.sum(), dir=d.sum(), upd=w.sum(), gram=ops.centered_gram(feats, clean).sum(),
        dot=ops.tangent_dot(r(5, 7, 33), r(5, 7, 6), r(3, 6, 33)).sum(),
        ker=ops.tangent_kernel(r(5, 7, 33), r(5, 7, 6), r(4, 2, 33), r(4, 2, 6)).sum(),
        big=ops.tangent_kernel(r(50, 4, 70), r(50, 4, 20), r(40, 4, 70), r(40, 4, 20)).sum(),
    )
    s = ops.barrier_stats([r(40, 3)], [r(40, 3)], [r(500)])
    c = ops.barrier_coefficient(s, 2.0)
    o = [torch.empty(40, 3, dtype=torch.float64)]
    ops.barrier_combine_(o, [r(40, 3)], [r(40, 3)], c)
    out.update(stats=s.sum(), coef=c, comb=o[0].sum())
    return {k: float(v) for k, v in out.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), key


def test_reference_fallback_matches_and_warns_once(monkeypatch):
    from nrcore.ops import _backend

    compiled = workload()
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("hidden for the test"))
    monkeypatch.setattr(_backend, "_warned", set())
    assert ops.backend() == "reference"
    with pytest.warns(RuntimeWarning, match="nrcore._C is not available") as record:
        fallback = workload()
        workload()
    assert len(record) == 1
    assert_same(fallback, compiled)


def test_require_compiled_turns_a_missing_module_into_an_error():
    block = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nrcore._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import nrcore.ops
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NRCORE_")}
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300,
                          env={**env, "NRCORE_REQUIRE_COMPILED": "1"})
    assert proc.returncode != 0 and "NRCORE_REQUIRE_COMPILED=1" in proc.stderr


def test_every_cpu_isa_level_agrees():
    import nrcore._C as C

    best_isa = C.cpu_isa()
    best = workload()
    try:
        for cap in ("base", "v3"):
            chosen = C.set_cpu_isa(cap)
            assert chosen == cap or (cap == "v3" and chosen == "base")
            assert_same(workload(), best)
    finally:
        assert C.set_cpu_isa("v4") == best_isa


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    st = ops.fbr_prepare(r(30, 5), torch.arange(30) % 3, 3)
    return [
        (torch.ops.nrcore.fbr_prepare, (r(30, 5), torch.arange(30) % 3, 3, True)),
        (torch.ops.nrcore.fbr_direction, (r(8, 5), torch.arange(8) % 3, st.mean, st.basis_t, st.counts, False, True, True, 1.0, 0.5, 1.0)),
        (torch.ops.nrcore.fbr_update_, (torch.rand(20), torch.arange(8), r(8), 0.1)),
        (torch.ops.nrcore.tangent_dot, (r(4, 3, 5), r(4, 3, 2), r(2, 2, 5), 0)),
        (torch.ops.nrcore.tangent_kernel, (r(4, 3, 5), r(4, 3, 2), r(3, 2, 5), r(3, 2, 2), 0)),
        (torch.ops.nrcore.conv_tangent_dot, (r(4, 3, 6, 6), r(4, 2, 6, 6), r(2, 2, 27), [3, 3], [1, 1], [1, 1], [1, 1], 0)),
        (torch.ops.nrcore.conv_tangent_kernel, (r(4, 3, 6, 6), r(4, 2, 6, 6), r(3, 3, 6, 6), r(3, 2, 6, 6), [3, 3], [1, 1], [1, 1], [1, 1], 0)),
        (torch.ops.nrcore.barrier_stats, ([r(3, 4), r(5)], [r(3, 4), r(5)], [r(7)])),
        (torch.ops.nrcore.barrier_coefficient, (torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64), 0.5)),
        (torch.ops.nrcore.barrier_combine_, ([r(3, 4), r(5)], [r(3, 4), r(5)], [r(3, 4), r(5)], None, 0.3,
                                                  torch.zeros((), dtype=torch.float64))),
    ]


@pytest.mark.parametrize("case", range(len(OP_NAMES)), ids=OP_NAMES)
def test_custom_op_registration_passes_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_under_torch_compile():
    """Fake kernels and mutation declarations are enough for a full graph (aot_eager: no C++
    compiler needed)."""
    g = torch.Generator().manual_seed(0)
    clean, labels = torch.randn(40, 6, generator=g), torch.arange(40) % 4
    stats = ops.fbr_prepare(clean, labels, 4)

    def step(feats, batch_labels, weights, index, acts, grads, D, f, q, a):
        d = ops.fbr_direction(feats, batch_labels, stats)
        ops.fbr_update_(weights, index, d, 0.01)
        t = ops.tangent_dot(acts, grads, D)
        s = ops.barrier_stats([f], [q], [a])
        outs = [torch.empty_like(f)]
        ops.barrier_combine_(outs, [f], [q], ops.barrier_coefficient(s, 0.25))
        return d, t, s, outs[0]

    args = (torch.randn(8, 6, generator=g), torch.arange(8) % 4, torch.full((16,), 0.5), torch.arange(8),
            torch.randn(8, 3, 5, generator=g), torch.randn(8, 3, 2, generator=g), torch.randn(2, 5, generator=g),
            torch.randn(10, generator=g), torch.randn(10, generator=g), torch.randn(4, generator=g))
    eager_w = args[2].clone()
    eager = step(*args[:2], eager_w, *args[3:])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    comp_w = args[2].clone()
    got = compiled(*args[:2], comp_w, *args[3:])
    for a, b in zip(eager, got):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(eager_w, comp_w)
