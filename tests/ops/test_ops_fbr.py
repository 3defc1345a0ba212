"""FBR ops: compiled vs the pure-PyTorch twin, the closed form vs a literal per-row loop of
Algorithm 1, and the update/Gram ops."""

from __future__ import annotations

import pytest
import torch

from nrcore import ops
from nrcore.ops import reference as ref


def clean_set(gen, m, d, C, *, offset=1.0, missing=()):
    """Clean features (with a common offset, so centring matters) and labels covering the classes
    except `missing`."""
    feats = torch.randn(m, d, generator=gen, dtype=torch.float64) + offset
    present = [c for c in range(C) if c not in missing]
    labels = torch.tensor(present, dtype=torch.long)[torch.randint(len(present), (m,), generator=gen)]
    labels[: len(present)] = torch.tensor(present)  # every present class appears
    return feats, labels


def algorithm1_rows(feats, labels, clean, clean_labels, C, *, center, row_shift, label_sign=True, lambda_pos=1.0, lambda_neg=None):
    """Algorithm 1 lines 3-13, one row at a time, as written (O(B m d)), in float64."""
    feats, clean = feats.double(), clean.double()
    mu = clean.mean(0) if center else torch.zeros(clean.shape[1], dtype=torch.float64)
    lneg = 1.0 / (C - 1) if lambda_neg is None else lambda_neg
    out = []
    for i in range(feats.shape[0]):
        K = [float((feats[i] - mu) @ (clean[j] - mu)) for j in range(clean.shape[0])]
        means = {}
        for c in range(C):
            members = [K[j] for j in range(len(K)) if int(clean_labels[j]) == c]
            if members:  # classes absent from the clean set are skipped
                means[c] = sum(members) / len(members)
        shift = sorted(means.values(), reverse=True)[1] if row_shift else 0.0
        total = 0.0
        for j, k in enumerate(K):
            if label_sign:
                sign = lambda_pos if int(labels[i]) == int(clean_labels[j]) else -lneg
            else:
                sign = lambda_pos
            total += sign * (k - shift)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("row_shift", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(missing=(1,)),  # a class absent from the clean set (and present in the batch)
        dict(lambda_pos=0.7, lambda_neg=0.3),
        dict(label_sign=False),
    ],
    ids=["default", "missing-class", "lambdas", "no-label-sign"],
)
def test_direction_matches_algorithm1_loop(device, gen, center, row_shift, case):
    C, m, d, B = 4, 37, 6, 9
    case = dict(case)
    clean, clean_labels = clean_set(gen, m, d, C, missing=case.pop("missing", ()))
    feats = torch.randn(B, d, generator=gen, dtype=torch.float64) + 1.0
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[0] = 1
    expected = algorithm1_rows(feats, labels, clean, clean_labels, C, center=center, row_shift=row_shift, **case)
    stats = ops.fbr_prepare(clean.to(device), clean_labels.to(device), C, center=center)
    got = ops.fbr_direction(feats.to(device), labels.to(device), stats, row_shift=row_shift, **case)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-9)
    literal = ref.fbr_direction_literal(feats, labels, clean, clean_labels, C, center=center, row_shift=row_shift, **case)
    torch.testing.assert_close(literal, expected, rtol=1e-10, atol=1e-9)


def test_row_shift_cancels_on_a_balanced_clean_set(gen):
    """docs/method-contract.md, FBR 3: balanced clean set, default lambdas -> every mask row sums to zero,
    so the shift cancels and d_i = n C/(C-1) s_iy."""
    C, per_class, d = 5, 8, 7
    clean = torch.randn(C * per_class, d, generator=gen, dtype=torch.float64)
    clean_labels = torch.arange(C).repeat_interleave(per_class)
    feats = torch.randn(11, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (11,), generator=gen)
    stats = ops.fbr_prepare(clean, clean_labels, C)
    shifted = ops.fbr_direction(feats, labels, stats, row_shift=True)
    plain = ops.fbr_direction(feats, labels, stats, row_shift=False)
    torch.testing.assert_close(shifted, plain, rtol=1e-10, atol=1e-10)
    s_y = ((feats - stats.mean) @ stats.class_means.T).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(shifted, per_class * C / (C - 1) * s_y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("center", [True, False])
def test_prepare_matches_twin(device, dtype, layout, relayout, check_close, gen, center):
    C, m, d = 6, 50, 13
    clean, labels = clean_set(gen, m, d, C, missing=(4,))
    x = relayout(clean.to(device=device, dtype=dtype), layout)
    got = ops.fbr_prepare(x, labels.to(device), C, center=center)
    want = ref.fbr_prepare(x, labels.to(device), C, center=center)
    check_close(got.basis_t, want.basis_t, dtype)
    check_close(got.mean, want.mean, dtype)
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert got.counts[4] == 0 and got.num_present == C - 1 and got.num_clean == m
    assert got.sq_norm_mean == pytest.approx(want.sq_norm_mean, rel=1e-6)
    assert got.class_means.shape == (C, d) and got.basis_t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize(
    "B,m,d,C",
    [(0, 10, 3, 2), (1, 5, 1, 2), (7, 40, 9, 3), (130, 300, 64, 10), (33, 500, 300, 37), (16, 400, 24, 100)],
)
@pytest.mark.parametrize("row_shift,label_sign,normalize", [(True, True, False), (False, True, True), (True, False, False)])
def test_direction_matches_twin(device, dtype, layout, relayout, check_close, gen, B, m, d, C, row_shift, label_sign, normalize):
    clean, clean_labels = clean_set(gen, m, d, C)
    feats = torch.randn(B, d, generator=gen, dtype=torch.float64) + 1.0
    labels = torch.randint(0, C, (B,), generator=gen)
    x = relayout(feats.to(device=device, dtype=dtype), layout)
    stats = ops.fbr_prepare(clean.to(device=device, dtype=dtype), clean_labels.to(device), C)
    kw = dict(row_shift=row_shift, label_sign=label_sign, normalize=normalize)
    got = ops.fbr_direction(x, labels.to(device), stats, **kw)
    want = ref.fbr_direction(x, labels.to(device), stats, **kw)
    assert got.shape == (B,) and got.dtype == stats.basis_t.dtype
    # the terms of the row sums are of size m |phi|^2 (or 1 when normalised): cancellation is expected
    scale = 1.0 if normalize else m * d * 4.0 / C
    check_close(got, want, dtype, scale=scale)


def test_direction_single_present_class(gen):
    clean = torch.randn(10, 4, generator=gen)
    labels = torch.zeros(10, dtype=torch.long)
    stats = ops.fbr_prepare(clean, labels, 3)
    feats = torch.randn(5, 4, generator=gen)
    batch_labels = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="row_shift needs at least 2 classes"):
        ops.fbr_direction(feats, batch_labels, stats)
    torch.testing.assert_close(
        ops.fbr_direction(feats, batch_labels, stats, row_shift=False),
        ref.fbr_direction(feats, batch_labels, stats, row_shift=False),
    )


def test_normalize_zero_spread_raises():
    stats = ops.fbr_prepare(torch.ones(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="zero spread"):
        ops.fbr_direction(torch.ones(2, 3), torch.tensor([0, 1]), stats, normalize=True)


def test_update_matches_twin(device, layout, relayout, gen):
    for dtype in (torch.float32, torch.float64):
        n, B = 50, 20
        w = relayout(torch.rand(n, generator=gen, dtype=dtype).to(device), layout)
        index = torch.randperm(n, generator=gen)[:B].to(device)
        direction = (torch.randn(B, generator=gen, dtype=dtype) * 3).to(device)  # pushes some past 0 and 1
        want = w.clone()
        ref.fbr_update_(want, index, direction, 0.4)
        out = ops.fbr_update_(w, index, direction, 0.4)
        assert out is w
        torch.testing.assert_close(w, want, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
        assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0
        untouched = torch.ones(n, dtype=torch.bool, device=device)
        untouched[index] = False
        assert torch.equal(w[untouched], want[untouched])


def test_update_casts_direction_dtype():
    w = torch.full((4,), 0.5, dtype=torch.float64)
    ops.fbr_update_(w, torch.tensor([2, 0]), torch.tensor([0.25, -1.0], dtype=torch.float32), 1.0)
    assert w.tolist() == [0.0, 0.5, 0.75, 0.5]


@pytest.mark.parametrize(
    "index,direction,match",
    [
        ([0, 9], [0.1, 0.1], r"index must hold positions in \[0, 4\]; index\[1\] is 9"),
        ([0, -1], [0.1, 0.1], r"index must hold positions in \[0, 4\]; index\[1\] is -1"),
        ([3, 3], [0.1, 0.1], "duplicate"),
        ([1, 2], [float("nan"), 0.1], "direction contains non-finite"),
    ],
)
def test_update_bad_data_leaves_weights_unchanged(index, direction, match):
    w = torch.full((5,), 0.5)
    with pytest.raises(ValueError, match=match):
        ops.fbr_update_(w, torch.tensor(index), torch.tensor(direction), 1.0)
    assert torch.equal(w, torch.full((5,), 0.5))


@pytest.mark.parametrize("B,m,d", [(1, 1, 1), (9, 31, 5), (128, 300, 70)])
@pytest.mark.parametrize("given_mean", [False, True])
def test_centered_gram_matches_twin(device, dtype, layout, relayout, check_close, gen, B, m, d, given_mean):
    feats = relayout((torch.randn(B, d, generator=gen) + 2).to(device=device, dtype=dtype), layout)
    clean = relayout((torch.randn(m, d, generator=gen) + 2).to(device=device, dtype=dtype), layout)
    mean = torch.randn(d, generator=gen).to(device) if given_mean else None
    got = ops.centered_gram(feats, clean, mean)
    want = ref.centered_gram(feats, clean, mean)
    assert got.shape == (B, m)
    check_close(got, want, dtype, scale=d * 10.0)
