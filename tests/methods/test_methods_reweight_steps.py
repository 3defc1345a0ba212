"""One training step of meta, l2rw and mwnet against the same step written out by hand with
autograd through the pseudo update (no shared code with the methods beyond torch)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nrcore.data import build_task
from nrcore.methods import get_method
from nrcore.methods.base import MethodContext, OptimConfig
from nrcore.models import build_model

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    return build_task("digits", noise="sym50", clean_size=100, val_size=0, seed=0)


def _method(task, name, model, **options):
    torch.manual_seed(0)
    ctx = MethodContext(task, "cpu", lambda: build_model(model, task.input_shape, task.num_classes), OptimConfig(LR, MOMENTUM, WD), 5, 32, 0)
    cls = get_method(name)
    kwargs = {o.name: o.default for o in cls.options}
    kwargs.update(options)
    return cls(ctx, **kwargs)


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


@pytest.mark.parametrize("hypergrad,model_name", [("tangent", "mlp"), ("autograd", "mlp"), ("autograd", "cnn")])
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


@pytest.mark.parametrize("hypergrad", ["tangent", "autograd"])
def test_mwnet_steps_by_hand(task, hypergrad):
    """∇φ L_val(θ'(φ)) with θ' the REAL optimiser's step (momentum, weight decay), then Adam on φ,
    then the real step with the updated weighting net."""
    method = _method(task, "mwnet", "mlp", hypergrad=hypergrad)
    model, vnet = copy.deepcopy(method.model), copy.deepcopy(method.vnet)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    vopt = torch.optim.Adam(vnet.parameters(), lr=1e-3, weight_decay=1e-4)
    for batch, clean in _batches(task):
        losses = F.cross_entropy(model(batch.x), batch.y, reduction="none")
        w = vnet(losses.detach())
        grads = torch.autograd.grad((w * losses).mean(), list(model.parameters()), create_graph=True)
        val = _lookahead_loss(model, _sgd_lookahead(opt, model, grads), clean)
        vopt.zero_grad()
        val.backward(inputs=list(vnet.parameters()))
        vopt.step()
        with torch.no_grad():
            new_w = vnet(losses)
        opt.zero_grad()
        (new_w * losses).mean().backward()
        opt.step()

        method.train_step(batch, clean)
        for p, q in zip(method.vnet.parameters(), vnet.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(method.weights[batch.index], new_w, rtol=1e-5, atol=1e-6)
        _check_same(method, model, opt)
