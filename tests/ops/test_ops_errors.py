"""Bad input: every op answers with a TypeError/ValueError that names the op and the argument,
never a crash or a silent NaN. Device mixes are tested with the 'meta' device (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from nrcore import ops

NAN = float("nan")


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device) if device != "meta" else torch.empty(*shape, dtype=dtype, device="meta")


def ints(*values):
    return torch.tensor(values, dtype=torch.long)


STATS = ops.fbr_prepare(torch.randn(12, 3), torch.arange(12) % 3, 3)


def with_nan(t, where=0):
    t = t.clone()
    t.view(-1)[where] = NAN
    return t


CASES = [
    # fbr_prepare
    ("prepare feats type", lambda: ops.fbr_prepare([[1.0]], ints(0), 2), TypeError, r"fbr_prepare: clean_feats must be a torch.Tensor"),
    ("prepare int feats", lambda: ops.fbr_prepare(torch.ones(3, 2, dtype=torch.long), ints(0, 1, 0), 2), TypeError, r"clean_feats must have dtype"),
    ("prepare 1-d feats", lambda: ops.fbr_prepare(x(3), ints(0, 1, 0), 2), ValueError, r"clean_feats must have 2 dimension"),
    ("prepare float labels", lambda: ops.fbr_prepare(x(3, 2), torch.zeros(3), 2), TypeError, r"clean_labels must be an integer tensor"),
    ("prepare label length", lambda: ops.fbr_prepare(x(3, 2), ints(0, 1), 2), ValueError, r"clean_labels must have length 3"),
    ("prepare num_classes<2", lambda: ops.fbr_prepare(x(3, 2), ints(0, 0, 0), 1), ValueError, r"num_classes must be >= 2"),
    ("prepare num_classes type", lambda: ops.fbr_prepare(x(3, 2), ints(0, 0, 0), 2.0), TypeError, r"num_classes must be an int"),
    ("prepare empty", lambda: ops.fbr_prepare(x(0, 2), ints(), 2), ValueError, r"clean set is empty"),
    ("prepare label range", lambda: ops.fbr_prepare(x(3, 2), ints(0, 2, 1), 2), ValueError, r"fbr_prepare: clean_labels must hold class ids in \[0, 1\]; clean_labels\[1\] is 2$"),
    ("prepare negative label", lambda: ops.fbr_prepare(x(3, 2), ints(0, -1, 1), 2), ValueError, r"clean_labels must hold class ids in \[0, 1\]; clean_labels\[1\] is -1$"),
    ("prepare nan", lambda: ops.fbr_prepare(with_nan(x(3, 2)), ints(0, 1, 1), 2), ValueError, r"fbr_prepare: clean_feats contains non-finite"),
    ("prepare device mix", lambda: ops.fbr_prepare(x(3, 2, device="meta"), ints(0, 1, 1), 2), ValueError, r"one device; clean_feats is on meta"),
    # fbr_direction
    ("direction stats type", lambda: ops.fbr_direction(x(2, 3), ints(0, 1), {"mean": 0}), TypeError, r"stats must be the FBRStats"),
    ("direction feature dim", lambda: ops.fbr_direction(x(2, 4), ints(0, 1), STATS), ValueError, r"feats has 4 features but stats was prepared with 3"),
    ("direction dtype", lambda: ops.fbr_direction(x(2, 3, dtype=torch.float64), ints(0, 1), STATS), TypeError, r"feats has dtype torch.float64 but stats"),
    ("direction labels", lambda: ops.fbr_direction(x(2, 3), ints(0, 3), STATS), ValueError, r"fbr_direction: labels must hold class ids in \[0, 2\]; labels\[1\] is 3$"),
    ("direction nan", lambda: ops.fbr_direction(with_nan(x(2, 3), 4), ints(0, 1), STATS), ValueError, r"fbr_direction: feats contains non-finite"),
    ("direction inf", lambda: ops.fbr_direction(torch.tensor([[float("inf"), 0, 0]]), ints(0), STATS), ValueError, r"feats contains non-finite"),
    ("direction lambda", lambda: ops.fbr_direction(x(2, 3), ints(0, 1), STATS, lambda_pos=NAN), ValueError, r"lambda_pos must be finite"),
    ("direction lambda type", lambda: ops.fbr_direction(x(2, 3), ints(0, 1), STATS, lambda_neg="1"), TypeError, r"lambda_neg must be a real number"),
    ("direction label length", lambda: ops.fbr_direction(x(2, 3), ints(0), STATS), ValueError, r"labels must have length 2"),
    ("direction device mix", lambda: ops.fbr_direction(x(2, 3, device="meta"), ints(0, 1), STATS), ValueError, r"feats is on meta but labels is on cpu"),
    # fbr_update_
    ("update weights dtype", lambda: ops.fbr_update_(torch.zeros(3, dtype=torch.long), ints(0), x(1), 0.1), TypeError, r"fbr_update_: weights must be float32 or float64"),
    ("update weights 2-d", lambda: ops.fbr_update_(torch.zeros(3, 1), ints(0), x(1), 0.1), ValueError, r"weights must have 1 dimension"),
    ("update lengths", lambda: ops.fbr_update_(torch.zeros(3), ints(0, 1), x(1), 0.1), ValueError, r"direction has length 1 but index has 2"),
    ("update index range", lambda: ops.fbr_update_(torch.zeros(3), ints(3), x(1), 0.1), ValueError, r"index must hold positions in \[0, 2\]; index\[0\] is 3$"),
    ("update step nan", lambda: ops.fbr_update_(torch.zeros(3), ints(0), x(1), NAN), ValueError, r"step_size must be finite"),
    ("update step type", lambda: ops.fbr_update_(torch.zeros(3), ints(0), x(1), None), TypeError, r"step_size must be a real number"),
    ("update device mix", lambda: ops.fbr_update_(torch.zeros(3), ints(0), x(1, device="meta"), 0.1), ValueError, r"direction is on meta"),
    # centered_gram
    ("gram widths", lambda: ops.centered_gram(x(2, 3), x(4, 5)), ValueError, r"centered_gram: clean_feats has 5 features but feats has 3"),
    ("gram empty", lambda: ops.centered_gram(x(2, 3), x(0, 3)), ValueError, r"clean set is empty"),
    ("gram dtypes", lambda: ops.centered_gram(x(2, 3), x(4, 3, dtype=torch.float64)), TypeError, r"clean_feats has dtype torch.float64 but feats"),
    ("gram mean shape", lambda: ops.centered_gram(x(2, 3), x(4, 3), x(2)), ValueError, r"mean has length 2"),
    ("gram nan", lambda: ops.centered_gram(x(2, 3), with_nan(x(4, 3))), ValueError, r"centered_gram: clean_feats contains non-finite"),
    # tangent
    ("dot acts 2-d", lambda: ops.tangent_dot(x(2, 3), x(2, 1, 4), x(4, 3)), ValueError, r"tangent_dot: acts must have 3 dimension"),
    ("dot mismatch", lambda: ops.tangent_dot(x(2, 3, 5), x(2, 2, 4), x(4, 5)), ValueError, r"acts \(2, 3, 5\) and grads \(2, 2, 4\) must agree"),
    ("dot direction shape", lambda: ops.tangent_dot(x(2, 3, 5), x(2, 3, 4), x(5, 4)), ValueError, r"direction must have shape \[q, p\] = \[4, 5\]"),
    ("dot direction dtype", lambda: ops.tangent_dot(x(2, 3, 5), x(2, 3, 4), x(4, 5, dtype=torch.float64)), TypeError, r"direction has dtype torch.float64"),
    ("dot strategy", lambda: ops.tangent_dot(x(2, 3, 5), x(2, 3, 4), x(4, 5), strategy="fast"), ValueError, r"strategy must be one of auto, ghost, explicit"),
    ("dot nan", lambda: ops.tangent_dot(x(2, 3, 5), with_nan(x(2, 3, 4)), x(4, 5)), ValueError, r"tangent_dot: grads contains non-finite"),
    ("dot int", lambda: ops.tangent_dot(torch.ones(2, 3, 5, dtype=torch.int32), x(2, 3, 4), x(4, 5)), TypeError, r"acts must have dtype"),
    ("dot device mix", lambda: ops.tangent_dot(x(2, 3, 5), x(2, 3, 4, device="meta"), x(4, 5)), ValueError, r"grads is on meta"),
    ("kernel widths", lambda: ops.tangent_kernel(x(2, 3, 5), x(2, 3, 4), x(2, 1, 6), x(2, 1, 4)), ValueError, r"tangent_kernel: the two batches must come from the same layer"),
    ("kernel nan", lambda: ops.tangent_kernel(x(2, 3, 5), x(2, 3, 4), with_nan(x(2, 1, 5)), x(2, 1, 4)), ValueError, r"tangent_kernel: acts_b contains non-finite"),
    ("kernel pair", lambda: ops.tangent_kernel(x(2, 3, 5), x(2, 3, 4), x(3, 1, 5), x(2, 1, 4)), ValueError, r"acts_b \(3, 1, 5\) and grads_b \(2, 1, 4\)"),
    # barrier
    ("stats not list", lambda: ops.barrier_stats(x(3), [x(3)], [x(3)]), TypeError, r"barrier_stats: grads_f_w must be a list or tuple"),
    ("stats empty", lambda: ops.barrier_stats([], [], [x(3)]), ValueError, r"grads_q_w is empty"),
    ("stats empty alpha", lambda: ops.barrier_stats([x(3)], [x(3)], []), ValueError, r"grads_q_alpha is empty"),
    ("stats lengths", lambda: ops.barrier_stats([x(3), x(2)], [x(3)], [x(3)]), ValueError, r"grads_f_w has 2 tensors but grads_q_w has 1"),
    ("stats shapes", lambda: ops.barrier_stats([x(3)], [x(4)], [x(3)]), ValueError, r"grads_f_w\[0\] has shape \(3,\) but grads_q_w\[0\] has \(4,\)"),
    ("stats element type", lambda: ops.barrier_stats([x(3), 1.0], [x(3), x(1)], [x(3)]), TypeError, r"grads_f_w\[1\] must be a torch.Tensor"),
    ("stats dtypes", lambda: ops.barrier_stats([x(3)], [x(3, dtype=torch.float64)], [x(3)]), TypeError, r"grads_f_w has dtype torch.float32 but grads_q_w has torch.float64"),
    ("stats mixed list", lambda: ops.barrier_stats([x(3), x(2, dtype=torch.float64)], [x(3), x(2, dtype=torch.float64)], [x(3)]), TypeError, r"grads_q_w\[1\] has dtype"),
    ("stats device mix", lambda: ops.barrier_stats([x(3)], [x(3)], [x(3, device="meta")]), ValueError, r"grads_q_alpha\[0\] is on meta"),
    ("coef shape", lambda: ops.barrier_coefficient(torch.zeros(3, dtype=torch.float64), 0.2), ValueError, r"barrier_coefficient: stats must be barrier_stats' \[4\] tensor"),
    ("coef delta", lambda: ops.barrier_coefficient(torch.zeros(4, dtype=torch.float64), "0.2"), TypeError, r"delta must be a real number"),
    ("combine lengths", lambda: ops.barrier_combine_([x(3)], [x(3)], [x(3), x(3)], 1.0), ValueError, r"barrier_combine_: grads_q has 2 tensors but outs has 1"),
    ("combine shapes", lambda: ops.barrier_combine_([x(3)], [x(2)], [x(3)], 1.0), ValueError, r"grads_f\[0\] has shape \(2,\) but outs\[0\] has \(3,\)"),
    ("combine dtypes", lambda: ops.barrier_combine_([x(3)], [x(3)], [x(3, dtype=torch.float64)], 1.0), TypeError, r"grads_q has dtype torch.float64 but outs has torch.float32"),
    ("combine coef", lambda: ops.barrier_combine_([x(3)], [x(3)], [x(3)], torch.ones(2)), TypeError, r"coef must be a float or a one-element float tensor"),
    ("combine coef nan", lambda: ops.barrier_combine_([x(3)], [x(3)], [x(3)], NAN), ValueError, r"coef must be finite"),
    ("combine outs dense", lambda: ops.barrier_combine_([x(6)[::2]], [x(3)], [x(3)], 1.0), ValueError, r"outs\[0\] is not dense"),
    ("combine empty", lambda: ops.barrier_combine_([], [], [], 1.0), ValueError, r"outs is empty"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_meta_tensors_trace_through_fake_kernels():
    """Shape-only (fake/meta) execution, as torch.compile does it, needs no data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.nrcore.tangent_dot(torch.empty(4, 3, 5), torch.empty(4, 3, 2), torch.empty(6, 2, 5), 0)
        assert out.shape == (4, 6)
        k = torch.ops.nrcore.tangent_kernel(torch.empty(4, 3, 5), torch.empty(4, 3, 2), torch.empty(7, 1, 5), torch.empty(7, 1, 2), 0)
        assert k.shape == (4, 7)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_out_of_range_labels_and_indices_give_the_range_and_the_offender_on_both_paths(backend, monkeypatch):
    from nrcore.ops import _backend

    if backend == "reference":
        monkeypatch.setattr(_backend, "_C", None)
        monkeypatch.setattr(_backend, "_IMPORT_ERROR", ImportError("hidden for the test"))
        monkeypatch.setattr(_backend, "_warned", {"missing"})  # the fallback warning is tested in test_ops_backend
    elif ops.backend() != "compiled":
        pytest.skip("no compiled module")
    with pytest.raises(ValueError, match=r"^fbr_prepare: clean_labels must hold class ids in \[0, 2\]; clean_labels\[3\] is 7$"):
        ops.fbr_prepare(x(5, 2), ints(0, 1, 2, 7, 9), 3)
    with pytest.raises(ValueError, match=r"^fbr_direction: labels must hold class ids in \[0, 2\]; labels\[0\] is -4$"):
        ops.fbr_direction(x(2, 3), ints(-4, 1), STATS)
    with pytest.raises(ValueError, match=r"^fbr_update_: index must hold positions in \[0, 2\]; index\[1\] is 3$"):
        ops.fbr_update_(torch.zeros(3), ints(0, 3), x(2), 0.1)
