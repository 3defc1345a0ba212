"""Shared by the method tests: a few training steps of any registered method on digits, built
the way the trainer builds it."""

from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture(scope="session")
def digits_task():
    from nrcore.data import build_task

    return build_task("digits", noise="sym50", clean_size=100, val_size=100, seed=0)


def method_steps(task, method_name: str, options: dict, *, steps: int = 2, channels_last: bool = False, model: str = "cnn",
                 around_step=contextlib.nullcontext, warmup: int = 0, phase: str = "last", device: str = "cpu",
                 host_reads_free=None):
    """(losses [steps], the method) after `warmup` plain steps and `steps` steps inside
    `around_step()`, from a fixed initialisation on fixed batches; `phase` "last" starts the
    last epoch (phased methods in their last phase), "first" the first."""
    from nrcore.methods import registry
    from nrcore.methods.base import MethodContext, OptimConfig
    from nrcore.models import build_model

    cls = registry()[method_name]
    ctx = MethodContext(task, device, lambda: build_model(model, task.input_shape, task.num_classes),
                        OptimConfig(lr=0.05, momentum=0.9, weight_decay=5e-4), epochs=4, batch_size=32, seed=0,
                        channels_last=channels_last)  # fmt: skip
    if host_reads_free is not None:
        ctx.host_reads_free = host_reads_free
    torch.manual_seed(0)
    method = cls(ctx, **{**{o.name: o.default for o in cls.options}, **options})
    method.start_epoch(method.num_epochs(ctx.epochs) - 1 if phase == "last" else 0)
    batches = iter(task.loader("train", 32, shuffle=True, generator=torch.Generator().manual_seed(1), device=device))
    clean = iter(task.loader("clean", 32, shuffle=True, generator=torch.Generator().manual_seed(2), device=device)) if cls.needs_clean else None
    losses = []
    for step in range(warmup + steps):
        batch, trusted = next(batches), next(clean) if clean is not None else None
        if step < warmup:
            method.train_step(batch, trusted)
            continue
        with around_step():
            losses.append(method.train_step(batch, trusted).loss)
    return torch.stack(losses), method


@pytest.fixture(scope="session")
def run_steps():
    return method_steps
