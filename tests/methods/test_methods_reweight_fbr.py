"""FBR and FBR-NTK steps against Algorithm 1 done by hand (literal B x m Gram, per-row loops)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nrcore import ops
from nrcore.data import build_task
from nrcore.methods import get_method
from nrcore.methods.base import MethodContext, OptimConfig
from nrcore.methods.fbr_ntk import tangent_layers
from nrcore.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return build_task("digits", noise="sym50", clean_size=100, val_size=0, seed=0)


def _method(task, name, model="mlp", **options):
    torch.manual_seed(0)
    ctx = MethodContext(task, "cpu", lambda: build_model(model, task.input_shape, task.num_classes), OptimConfig(0.05), 5, 32, 0)
    cls = get_method(name)
    kwargs = {o.name: o.default for o in cls.options}
    kwargs.update(options)
    return cls(ctx, **kwargs)


def _first_batch(task):
    return next(iter(task.loader("train", 32, shuffle=True, generator=torch.Generator().manual_seed(1))))


def literal_direction(feats, labels, clean_feats, clean_labels, num_classes, *, lambda_pos=1.0, lambda_neg=None,
                      center=True, row_shift=True, label_sign=True, normalize=False):
    """Algorithm 1 lines 3-13, row by row, with the B x m matrix (float64)."""
    feats, clean_feats = feats.double(), clean_feats.double()
    lambda_neg = 1.0 / (num_classes - 1) if lambda_neg is None else lambda_neg
    mu = clean_feats.mean(0) if center else torch.zeros(feats.shape[1], dtype=torch.float64)
    K = (feats - mu) @ (clean_feats - mu).T
    present = [c for c in range(num_classes) if (clean_labels == c).any()]
    out = torch.empty(len(feats), dtype=torch.float64)
    for i in range(len(feats)):
        s = {c: K[i, clean_labels == c].mean() for c in present}
        ranked = sorted(present, key=lambda c: -s[c].item())
        shift = s[ranked[1]] if row_shift else 0.0
        Kt = K[i] - shift
        if label_sign:
            mask = torch.where(clean_labels == labels[i], lambda_pos, -lambda_neg).double()
        else:
            mask = torch.full_like(Kt, lambda_pos)
        out[i] = (mask * Kt).sum()
    if normalize:
        out /= len(clean_feats) * (clean_feats - mu).pow(2).sum(1).mean()
    return out


def _clean_set(task, model):
    xs, ys = zip(*[(b.x, b.y) for b in task.loader("clean", 1000)])
    with torch.no_grad():
        return model.features(torch.cat(xs)), torch.cat(ys)


SETTINGS = [
    dict(),
    dict(lambda_neg=0.3),  # the row shift matters
    dict(lambda_neg=0.3, center=False),
    dict(lambda_neg=0.3, row_shift=False),
    dict(lambda_neg=0.0, lambda_pos=2.0),
    dict(label_sign=False),
    dict(normalize=False, step_size=1e-3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_fbr_step_is_algorithm_1_with_the_sign_fix(task, settings):
    method = _method(task, "fbr", **settings)
    method.weights.uniform_(0.2, 0.8, generator=torch.Generator().manual_seed(2))
    method.start_epoch(0)
    batch = _first_batch(task)
    model, weights_before = copy.deepcopy(method.model), method.weights.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    clean_feats, clean_labels = _clean_set(task, model)
    logits, feats = model(batch.x, return_features=True)
    keys = ("lambda_pos", "lambda_neg", "center", "row_shift", "label_sign", "normalize")
    options = {k: getattr(method, k) if k != "lambda_neg" else method.lambda_neg for k in keys}
    d = literal_direction(feats.detach(), batch.y, clean_feats, clean_labels, task.num_classes, **options)
    expected_w = (weights_before[batch.index].double() + method.step_size * d).clamp(0, 1)  # `+`: the sign fix
    loss = (expected_w.float() * F.cross_entropy(logits, batch.y, reduction="none")).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

    method.train_step(batch, None)
    torch.testing.assert_close(method.weights[batch.index].double(), expected_w, rtol=0, atol=1e-5)
    untouched = torch.ones_like(method.weights, dtype=torch.bool)
    untouched[batch.index] = False
    assert torch.equal(method.weights[untouched], weights_before[untouched])
    for p, q in zip(method.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    if method.label_sign:  # some examples go up, some down (without the mask all follow -m·shift)
        moved = expected_w - weights_before[batch.index].double()
        assert (moved > 0).any() and (moved < 0).any()


def test_row_shift_is_a_no_op_at_the_defaults_with_a_balanced_clean_set(task):
    directions = []
    for row_shift in (True, False):
        method = _method(task, "fbr", row_shift=row_shift, normalize=False, step_size=1e-4)
        method.start_epoch(0)
        method.train_step(_first_batch(task), None)
        directions.append(method.weights.clone())
    torch.testing.assert_close(directions[0], directions[1], rtol=0, atol=1e-6)
    counts = torch.bincount(task.clean.labels)
    assert (counts == counts[0]).all()


def test_lambda_neg_schedule(task):
    constant = _method(task, "fbr")
    assert [constant.lambda_neg_at(e) for e in (0, 2, 4)] == pytest.approx([1 / 9] * 3)
    linear = _method(task, "fbr", lambda_schedule="linear", lambda_neg=0.5, lambda_neg_end=0.1)
    assert [linear.lambda_neg_at(e) for e in range(5)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    linear.start_epoch(2)
    assert linear.lambda_neg == pytest.approx(0.3)


def test_tangent_layers_pick_the_last_block_and_the_classifier():
    assert tangent_layers(build_model("cnn", (1, 28, 28), 10), "last-block") == ["body.8", "body.9", "classifier"]
    assert tangent_layers(build_model("resnet32", (3, 32, 32), 10), "last-block") == ["layer3.4", "classifier"]
    assert tangent_layers(build_model("mlp", (1, 8, 8), 10), "last-block") == ["body.3", "classifier"]
    assert tangent_layers(build_model("mlp", (1, 8, 8), 10), "classifier") == ["classifier"]
    assert tangent_layers(build_model("mlp", (1, 8, 8), 10), "all") is None


@pytest.mark.parametrize("center", [True, False])
def test_fbr_ntk_direction_is_fbr_on_explicit_tangent_features(task, center):
    """Per-example ∇_{θ_S} r·f(x) formed one example at a time, then the FBR closed form."""
    method = _method(task, "fbr-ntk", center=center, lambda_neg=0.3, step_size=1e-3)
    method.start_epoch(3)
    assert set(method.signs.tolist()) <= {-1.0, 1.0}
    batch = _first_batch(task)
    model, before = copy.deepcopy(method.model), method.weights.clone()
    names = set(method.recorder.parameters)
    params = [p for n, p in model.named_parameters() if n in names]

    def tangent_features(x):
        rows = []
        for xi in x:
            grads = torch.autograd.grad(model(xi[None])[0] @ method.signs, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return torch.stack(rows)

    xs, ys = zip(*[(b.x, b.y) for b in task.loader("clean", 1000)])
    stats = ops.fbr_prepare(tangent_features(torch.cat(xs)), torch.cat(ys), task.num_classes, center=center)
    d = ops.fbr_direction(tangent_features(batch.x), batch.y, stats, lambda_neg=0.3, normalize=True)
    assert stats.sq_norm_mean == pytest.approx(method.stats.sq_norm_mean, rel=1e-4)
    method.train_step(batch, None)
    torch.testing.assert_close((method.weights - before)[batch.index], 1e-3 * d, rtol=1e-3, atol=1e-7)
