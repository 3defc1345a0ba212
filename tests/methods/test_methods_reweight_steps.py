"""One step of each reweighting method against the same step written out by hand, and the
shared one-step look-ahead hypergradient against autograd and finite differences.

Hand-written references use torch only (no code shared with the methods): meta, l2rw and mwnet
differentiate through the pseudo update; FBR builds Algorithm 1's B x m Gram matrix and loops
over rows; FBR-NTK forms each example's tangent feature with its own backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nrcore import ops
from nrcore.data import build_task
from nrcore.methods.families import reweighting as rw
from nrcore.methods import get_method
from nrcore.models.functional import FunctionalSGD, functional_forward, grads_dict, trainable_params
from nrcore.methods.base import MethodContext, OptimConfig
from nrcore.methods.fbr_ntk import tangent_layers
from nrcore.models import build_model

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return build_task("digits", noise="sym50", clean_size=100, val_size=0, seed=0)


def _method(task, name, model="mlp", **options):
    torch.manual_seed(0)
    ctx = MethodContext(task, "cpu", lambda: build_model(model, task.input_shape, task.num_classes), OptimConfig(LR, MOMENTUM, WD), 5, 32, 0)
    cls = get_method(name)
    kwargs = {o.name: o.default for o in cls.options}
    kwargs.update(options)
    return cls(ctx, **kwargs)


def _first_batch(task):
    return next(iter(task.loader("train", 32, shuffle=True, generator=torch.Generator().manual_seed(1))))


# ---- the hypergradient ------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10)).double()


def _cnn_eval():
    return build_model("cnn", (1, 8, 8), 10).double().eval()


def _setup(make_model, seed=0):
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()  # momentum buffers exist from here on
    opt.step()
    opt.zero_grad()
    data = dict(x=torch.randn(12, 1, 8, 8, dtype=torch.float64), y=torch.randint(0, 10, (12,)),
                xv=torch.randn(10, 1, 8, 8, dtype=torch.float64), yv=torch.randint(0, 10, (10,)),
                w=torch.rand(12, dtype=torch.float64))
    return model, opt, data


def _hypergrad(model, opt, data, mode, rule, at_zero=False):
    mg = rw.MetaGradient(model, opt, rule=rule, mode=mode)
    w = torch.zeros_like(data["w"]) if at_zero else data["w"]
    return mg.hypergradient(mg.forward(data["x"], data["y"]), w, data["xv"], data["yv"], at_zero=at_zero)[0]


def _cnn_train():
    return build_model("cnn", (1, 8, 8), 10).double().train()


@pytest.mark.parametrize("mode", ["tangent", "tangent_explicit", "jvp"])
@pytest.mark.parametrize("rule", ["sgd", "optimizer"])
@pytest.mark.parametrize("make_model", [_mlp, _cnn_eval, _cnn_train], ids=["bn-free", "bn-eval", "bn-train"])
def test_hypergradient_without_second_derivatives_equals_autograd(make_model, rule, mode, monkeypatch):
    """tangent: per-example gradients never formed, products through nrcore.ops.tangent_dot;
    tangent_explicit: formed once, then matrix products; jvp: forward mode. Under train-mode
    BatchNorm only jvp is exact."""
    if make_model is _cnn_train and mode != "jvp":
        pytest.skip("per-example gradients of a train-mode BatchNorm model are a decomposition, not exact")
    if mode == "tangent_explicit":
        monkeypatch.setattr(rw.MetaGradient, "explicit_example_grads", True)
    model, opt, data = _setup(make_model)
    state = copy.deepcopy(model.state_dict())
    fast = _hypergrad(model, opt, data, "jvp" if mode == "jvp" else "tangent", rule)
    model.load_state_dict(state)  # the same running statistics for the reference
    reference = _hypergrad(model, opt, data, "autograd", rule)
    assert reference.abs().max() > 1e-6
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_auto_hypergradient_is_tangent_without_batchnorm_and_jvp_with_it():
    assert rw.resolve_hypergrad("auto", _mlp()) == "tangent"
    assert rw.resolve_hypergrad("auto", _cnn_train()) == "jvp"
    assert rw.resolve_hypergrad("autograd", _mlp()) == "autograd"


def test_tangent_hypergradient_at_zero_weights_equals_autograd():
    model, opt, data = _setup(_cnn_eval)
    tangent = _hypergrad(model, opt, data, "tangent", "sgd", at_zero=True)
    reference = _hypergrad(model, opt, data, "autograd", "sgd", at_zero=True)
    assert (tangent - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_autograd_hypergradient_matches_finite_differences():
    """The reference itself: d L_val(θ'(w)) / d w_i by central differences, through the real
    optimiser's look-ahead (momentum, Nesterov, weight decay)."""
    model, opt, data = _setup(_mlp)
    named = trainable_params(model)
    fsgd = FunctionalSGD(opt, named)

    def val_loss(w):
        losses = F.cross_entropy(model(data["x"]), data["y"], reduction="none")
        shifted, _ = fsgd.step(dict(named), grads_dict((w * losses).mean(), named))
        return F.cross_entropy(functional_forward(model, shifted, data["xv"]), data["yv"]).item()

    h = _hypergrad(model, opt, data, "autograd", "optimizer")
    eps = 1e-6
    for i in (0, 5, 11):
        up, down = data["w"].clone(), data["w"].clone()
        up[i] += eps
        down[i] -= eps
        assert (val_loss(up) - val_loss(down)) / (2 * eps) == pytest.approx(h[i].item(), rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("momentum,nesterov,dampening,warm", [(0.0, False, 0.0, True), (0.9, False, 0.0, False), (0.9, False, 0.3, True), (0.9, True, 0.0, True), (0.9, True, 0.0, False)])
def test_lookahead_grad_scale_is_the_slope_of_the_optimiser_step(momentum, nesterov, dampening, warm):
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum, nesterov=nesterov, dampening=dampening, weight_decay=1e-3)
    if warm:
        F.cross_entropy(model(torch.randn(4, 64, dtype=torch.float64)), torch.randint(0, 10, (4,))).backward()
        opt.step()
    look = rw.Lookahead(model, opt, "optimizer")
    zero = {n: torch.zeros_like(p) for n, p in look.named.items()}
    ones = {n: torch.ones_like(p) for n, p in look.named.items()}
    base, moved = look.step(zero), look.step(ones)
    for name, scale in look.grad_scale().items():
        torch.testing.assert_close(base[name] - moved[name], torch.full_like(base[name], scale))
    assert all(s == 0.3 for s in rw.Lookahead(model, opt, "sgd").grad_scale().values())


def test_train_mode_batchnorm_per_example_gradients_sum_to_the_batch_gradient():
    """Joint-backward convention: exact decomposition of the batch gradient, and the recorded
    forward is the model's native one (the real step back-propagates it exactly)."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10).double().train()
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    recorder = rw.joint_batchnorm_recorder(model)
    out, losses, grads = rw.record_example_gradients(recorder, x, lambda o: F.cross_entropy(o, y, reduction="none"), retain_graph=True)
    summed = grads.weighted_sum(torch.ones(16, dtype=torch.float64))
    exact = grads_dict(losses.sum(), trainable_params(model))
    for name, g in exact.items():
        torch.testing.assert_close(summed[name], g, rtol=1e-10, atol=1e-12)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(out, reference(x))


def test_meta_lookahead_leaves_batchnorm_running_statistics_to_the_real_forward():
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for mode in ("tangent", "autograd"):
        bn = model.body[1]
        before = bn.num_batches_tracked.item()
        mg = rw.MetaGradient(model, opt, mode=mode)
        fwd = mg.forward(x, y)
        mean_after_forward = bn.running_mean.clone()
        mg.hypergradient(fwd, torch.rand(16), x + 1, y)
        mg.step(fwd, torch.rand(16))
        assert bn.num_batches_tracked.item() == before + 1
        assert torch.equal(bn.running_mean, mean_after_forward)


# ---- meta, l2rw, mwnet: one step by hand ---------------------------------------------------------


def _batches(task):
    g = torch.Generator().manual_seed(1)
    noisy = iter(task.loader("train", 32, shuffle=True, generator=g))
    clean = iter(task.loader("clean", 32, shuffle=True, generator=g))
    return [(next(noisy), next(clean)) for _ in range(2)]


def _lookahead_loss(model, params, clean):
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # look-ahead: running stats untouched
    return F.cross_entropy(functional_call(model, {**params, **buffers}, (clean.x,)), clean.y)


def _sgd_lookahead(opt, model, grads):
    """θ' of the real optimiser's rule (momentum from its buffers, weight decay), by hand."""
    out = {}
    for (name, p), g in zip(model.named_parameters(), grads):
        d = g + WD * p
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        d = d if buf is None else MOMENTUM * buf + d
        out[name] = p - LR * d
    return out


def _check_same(method, model, opt_model):
    for p, q in zip(method.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-6)
    for b, c in zip(method.model.buffers(), model.buffers()):
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("hypergrad,model_name", [("tangent", "mlp"), ("autograd", "mlp"), ("autograd", "cnn"), ("jvp", "cnn")])
def test_meta_steps_by_hand(task, hypergrad, model_name):
    beta = 0.05
    method = _method(task, "meta", model_name, beta=beta, hypergrad=hypergrad)
    model = copy.deepcopy(method.model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    weights = torch.full((method.ctx.n_train,), 0.5)
    for batch, clean in _batches(task):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        w = weights[batch.index].clone().requires_grad_()
        grads = torch.autograd.grad((w * losses).mean(), list(model.parameters()), create_graph=True)
        shifted = {n: p - LR * g for (n, p), g in zip(model.named_parameters(), grads)}  # plain SGD pseudo step
        (h,) = torch.autograd.grad(_lookahead_loss(model, shifted, clean), w, retain_graph=True)
        eta = LR / len(batch)
        new_w = (w.detach() - beta / eta * h).clamp(0, 1)
        weights[batch.index] = new_w
        opt.zero_grad()
        (new_w * losses).mean().backward()
        opt.step()

        method.train_step(batch, clean)
        torch.testing.assert_close(method.weights, weights, rtol=0, atol=1e-5)
        _check_same(method, model, opt)
    assert ((weights != 0.5) & (weights > 0) & (weights < 1)).any()


@pytest.mark.parametrize("hypergrad", ["tangent", "autograd"])
def test_l2rw_steps_by_hand(task, hypergrad):
    method = _method(task, "l2rw", "mlp", hypergrad=hypergrad)
    model = copy.deepcopy(method.model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for batch, clean in _batches(task):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        eps = torch.zeros(len(batch), requires_grad=True)
        grads = torch.autograd.grad((eps * losses).mean(), list(model.parameters()), create_graph=True)
        shifted = {n: p - LR * g for (n, p), g in zip(model.named_parameters(), grads)}
        (h,) = torch.autograd.grad(_lookahead_loss(model, shifted, clean), eps, retain_graph=True)
        useful = (-h).clamp_min(0)
        w = useful / useful.sum()
        opt.zero_grad()
        (w * losses).sum().backward()
        opt.step()

        method.train_step(batch, clean)
        torch.testing.assert_close(method.weights[batch.index], useful / useful.max(), rtol=1e-4, atol=1e-6)
        _check_same(method, model, opt)
        assert 0 < int((useful > 0).sum()) < len(batch)


@pytest.mark.parametrize("hypergrad,normalize", [("tangent", False), ("jvp", False), ("autograd", False), ("tangent", True), ("autograd", True)])
def test_mwnet_steps_by_hand(task, hypergrad, normalize):
    """∇φ L_val(θ'(φ)) with θ' the REAL optimiser's step (momentum, weight decay), then Adam on φ,
    then the real step with the updated weighting net; `normalize`: both losses are
    Σ_i w_i l_i / Σ_j w_j, differentiated through the sum."""
    method = _method(task, "mwnet", "mlp", hypergrad=hypergrad, normalize_weights=normalize)

    def weighted_loss(w, losses):
        return (w * losses).sum() / w.sum() if normalize else (w * losses).mean()

    model, vnet = copy.deepcopy(method.model), copy.deepcopy(method.vnet)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    vopt = torch.optim.Adam(vnet.parameters(), lr=1e-3, weight_decay=1e-4)
    for batch, clean in _batches(task):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        w = vnet(losses.detach())
        grads = torch.autograd.grad(weighted_loss(w, losses), list(model.parameters()), create_graph=True)
        val = _lookahead_loss(model, _sgd_lookahead(opt, model, grads), clean)
        vopt.zero_grad()
        val.backward(inputs=list(vnet.parameters()))
        vopt.step()
        with torch.no_grad():
            new_w = vnet(losses)
        opt.zero_grad()
        weighted_loss(new_w, losses).backward()
        opt.step()

        method.train_step(batch, clean)
        for p, q in zip(method.vnet.parameters(), vnet.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(method.weights[batch.index], new_w, rtol=1e-5, atol=1e-6)
        _check_same(method, model, opt)


# ---- FBR and FBR-NTK against Algorithm 1 by hand ---------------------------------------------


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


def test_check_number_names_the_flag_and_rejects_nan_inf_bools():
    from nrcore.methods.base import check_number

    check_number("beta", 0.0, minimum=0)
    check_number("vnet_hidden", 3, minimum=1)
    for value, fragment in ((float("nan"), "finite"), (float("inf"), "finite"), (True, "finite"), ("1", "finite"), (-0.5, ">= 0")):
        with pytest.raises(ValueError, match=f"--step-size must be.*{fragment}"):
            check_number("step_size", value, minimum=0)
    with pytest.raises(ValueError, match="--vnet-lr must be > 0, got 0"):
        check_number("vnet_lr", 0, minimum=0, exclusive=True)
