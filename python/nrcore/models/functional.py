"""A model's forward with substituted parameters that leaves BatchNorm running statistics alone,
and the SGD update rule as a differentiable function: what look-ahead (meta-learning) methods
and feature passes are built from.

Look-ahead (virtual) steps must not change BatchNorm running statistics (docs/method-contract.md): only the real
training-mode forward of the actual update may. `functional_forward` therefore runs the model
on copies of its buffers unless `track_bn_stats=True`.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

Params = Dict[str, torch.Tensor]


def trainable_params(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Named parameters that require grad, in registration order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def functional_forward(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    *,
    return_features: bool = False,
    track_bn_stats: bool = False,
):
    """`model(x)` with `params` in place of its parameters (missing names use the model's own).

    In train mode BatchNorm still normalises with batch statistics, but its running statistics
    are updated on throw-away copies unless `track_bn_stats` is True."""
    buffers = {name: b if track_bn_stats else b.clone() for name, b in model.named_buffers()}
    kwargs = {"return_features": True} if return_features else {}
    return torch.func.functional_call(model, {**params, **buffers}, (x,), kwargs, strict=False)


def grads_dict(loss: torch.Tensor, params: Params, *, create_graph: bool = False, retain_graph: Optional[bool] = None) -> Params:
    """d loss / d params as a dict (zeros for parameters the loss does not reach)."""
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


class FunctionalSGD:
    """The update rule of a `torch.optim.SGD` instance (lr, momentum, dampening, nesterov,
    weight decay, per param group) as a pure, differentiable function.

    Momentum buffers start from the real optimiser's state and are returned, never written back,
    so a look-ahead of one or more steps leaves the optimiser untouched. Matches
    `torch.optim.SGD.step` exactly (tests check it)."""

    def __init__(self, optimizer: torch.optim.SGD, named: Dict[str, nn.Parameter]):
        if not isinstance(optimizer, torch.optim.SGD):
            raise TypeError(f"FunctionalSGD needs a torch.optim.SGD, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        group_of = {}
        for group in optimizer.param_groups:
            if group.get("maximize", False):
                raise ValueError("FunctionalSGD does not support maximize=True")
            for p in group["params"]:
                group_of[p] = group
        missing = [n for n, p in named.items() if p not in group_of]
        if missing:
            raise ValueError(f"parameters not in the optimiser: {missing[:3]}")
        self.groups = {n: group_of[p] for n, p in named.items()}
        self.named = named

    def initial_buffers(self) -> Dict[str, Optional[torch.Tensor]]:
        return {n: self.optimizer.state.get(p, {}).get("momentum_buffer") for n, p in self.named.items()}

    def step(
        self,
        params: Params,
        grads: Params,
        buffers: Optional[Dict[str, Optional[torch.Tensor]]] = None,
        *,
        lr_scale: float = 1.0,
    ) -> Tuple[Params, Dict[str, Optional[torch.Tensor]]]:
        """One SGD step from `params` with `grads`; returns (new params, new momentum buffers)."""
        if buffers is None:
            buffers = self.initial_buffers()
        new_params, new_buffers = {}, {}
        for name, p in params.items():
            group = self.groups[name]
            d_p = grads[name]
            if group["weight_decay"]:
                d_p = d_p + group["weight_decay"] * p
            momentum = group["momentum"]
            buf = buffers.get(name)
            if momentum:
                buf = d_p if buf is None else momentum * buf + (1 - group["dampening"]) * d_p
                d_p = d_p + momentum * buf if group["nesterov"] else buf
            new_params[name] = p - group["lr"] * lr_scale * d_p
            new_buffers[name] = buf
        return new_params, new_buffers


def set_grads(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor]) -> None:
    """Write precomputed gradients into `.grad` (for an optimiser step), detached."""
    for p, g in zip(params, grads):
        p.grad = g.detach().clone() if p.grad is None else p.grad.copy_(g)
