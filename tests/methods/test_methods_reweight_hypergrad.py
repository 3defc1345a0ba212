"""The one-step look-ahead hypergradient the reweighting family shares (meta, l2rw, mwnet)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrcore.methods import _reweighting as rw
from nrcore.methods._functional import FunctionalSGD, functional_forward, grads_dict, trainable_params
from nrcore.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "tangent_dot"])
@pytest.mark.parametrize("rule", ["sgd", "optimizer"])
@pytest.mark.parametrize("make_model", [_mlp, _cnn_eval], ids=["bn-free", "bn-eval"])
def test_tangent_hypergradient_equals_autograd(make_model, rule, explicit, monkeypatch):
    if not explicit:  # per-example gradients never formed: products through nrcore.ops.tangent_dot
        monkeypatch.setattr(rw, "PER_EXAMPLE_BUDGET_BYTES", 0)
    model, opt, data = _setup(make_model)
    tangent = _hypergrad(model, opt, data, "tangent", rule)
    reference = _hypergrad(model, opt, data, "autograd", rule)
    assert reference.abs().max() > 1e-6
    assert (tangent - reference).abs().max() <= 1e-5 * reference.abs().max()


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
