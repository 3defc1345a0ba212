"""The shared functional pieces of the meta-learning methods."""

import pytest
import torch
from torch import nn

from nrcore.models.functional import FunctionalSGD, functional_forward, grads_dict, trainable_params


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("momentum,nesterov,weight_decay,dampening", [(0.0, False, 0.0, 0.0), (0.9, False, 5e-4, 0.0), (0.9, True, 1e-3, 0.0), (0.5, False, 0.0, 0.3)])
def test_functional_sgd_matches_torch_sgd_over_steps(momentum, nesterov, weight_decay, dampening):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, dampening=dampening)
    named = trainable_params(model)
    fsgd = FunctionalSGD(opt, named)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(3):  # includes the first step (no momentum buffer yet) and later ones
        params = {n: p.detach().clone() for n, p in named.items()}
        loss = nn.functional.cross_entropy(model(x), y)
        grads = grads_dict(loss, named)
        expected, _ = fsgd.step(params, grads)
        opt.zero_grad()
        nn.functional.cross_entropy(functional_forward(model, named, x, track_bn_stats=True), y).backward()
        opt.step()
        for n, p in named.items():
            torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-6)


def test_functional_sgd_leaves_optimizer_state_untouched():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(torch.randn(8, 5)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    named = trainable_params(model)
    before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in named.items()}
    grads = {n: torch.ones_like(p) for n, p in named.items()}
    FunctionalSGD(opt, named).step(dict(named), grads)
    for n, p in named.items():
        assert torch.equal(opt.state[p]["momentum_buffer"], before[n])


def test_functional_forward_keeps_bn_running_stats_unless_asked():
    model = _model().train()
    named = trainable_params(model)
    bn = model[1]
    mean0, count0 = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    functional_forward(model, named, torch.randn(8, 5) + 3)
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.num_batches_tracked, count0)
    functional_forward(model, named, torch.randn(8, 5) + 3, track_bn_stats=True)
    assert not torch.equal(bn.running_mean, mean0) and bn.num_batches_tracked.item() == count0.item() + 1


def test_functional_forward_is_differentiable_in_substituted_params():
    model = _model().eval()
    named = trainable_params(model)
    shifted = {n: p.detach().clone().requires_grad_() for n, p in named.items()}
    out = functional_forward(model, shifted, torch.randn(4, 5)).sum()
    grads = grads_dict(out, shifted)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("3."))
