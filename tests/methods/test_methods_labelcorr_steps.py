"""One training step of mlc, mlc-d and ebomlc on tiny hand-made data, against hand-written
computations of the papers' algorithms (float64), plus BatchNorm and non-finite handling."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nrcore.data.types import Batch, Split, Task
from nrcore.methods import MethodContext, OptimConfig, get_method
from nrcore.models import CNN

C, SHAPE = 3, (1, 8, 8)


@pytest.fixture(autouse=True)
def float64_one_thread():
    """float64 for tight comparisons; one thread (tiny tensors; a busy machine makes a second
    OpenMP thread spin rather than help)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def _task() -> Task:
    labels = torch.arange(12) % C
    split = Split(labels=labels, true_labels=labels, source_index=torch.arange(12), images=torch.zeros(12, *SHAPE, dtype=torch.uint8))
    return Task(dataset="hand-made", num_classes=C, input_shape=SHAPE, train=split, test=split)


def _batch(seed: int, n: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(n, *SHAPE, generator=g), y=torch.randint(0, C, (n,), generator=g), index=torch.arange(n))


def make_method(name: str, **options):
    """A method on a tiny BatchNorm CNN, after two warm-up steps (so momentum buffers, Adam
    moments and BN running statistics are non-trivial)."""
    torch.manual_seed(0)
    ctx = MethodContext(
        task=_task(), device="cpu", model_factory=lambda: CNN(SHAPE, C, widths=(4, 4, 6)),
        optim=OptimConfig(lr=0.1, momentum=0.9, weight_decay=5e-4), epochs=1, batch_size=10, seed=0,
    )
    cls = get_method(name)
    settings = {o.name: o.default for o in cls.options}
    settings.update(meta_lr=1e-2, meta_hidden=8, label_dim=5, **options)
    method = cls(ctx, **settings)
    for step in range(2):
        method.train_step(_batch(100 + step, 10), _batch(200 + step, 6))
    return method


def clone_state(method):
    """Copies of the main and meta models with optimisers in the same state as the method's."""
    model, meta = copy.deepcopy(method.model), copy.deepcopy(method.meta)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.load_state_dict(copy.deepcopy(method.opt.state_dict()))  # load_state_dict shares tensors
    meta_opt = torch.optim.Adam(meta.parameters(), lr=method.meta_opt.param_groups[0]["lr"])
    meta_opt.load_state_dict(copy.deepcopy(method.meta_opt.state_dict()))
    return model, meta, opt, meta_opt


def corrected(meta, feats, labels):
    """g_α(h, ỹ) written out: embedding, concat, MLP, softmax."""
    return meta.net(torch.cat([feats, meta.label_embedding.weight[labels]], 1)).softmax(1)


def lookahead_forward(model, params, x, features=False):
    """Forward with substituted parameters on copies of the BN buffers (batch statistics)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return functional_call(model, {**params, **buffers}, (x,), {"return_features": True} if features else {})


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def assert_same_state(method, model, meta):
    for (name, p), q in zip(method.model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=f"main model {name}")
    for (name, p), q in zip(method.meta.state_dict().items(), meta.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=f"meta model {name}")


def barrier_reference_step(method, noisy, clean, *, k, rho, xi, delta):
    """Algorithm 2 (EBOMLC) / Algorithm 1 (MLC-D: rho=1, xi=1) by hand, on copies."""
    model, meta, opt, meta_opt = clone_state(method)
    w = dict(model.named_parameters())
    alpha = list(meta.parameters())
    lr = opt.param_groups[0]["lr"]

    logits, h = model(noisy.x, return_features=True)  # real forward: BN running stats move
    t = corrected(meta, h.detach(), noisy.y)

    def lower(out):  # G with the corrected labels t
        return -(t * out.log_softmax(1)).sum(1).mean()

    grad_q_w = torch.autograd.grad(lower(logits), list(w.values()), retain_graph=True)
    w_k = {n: (p - lr * g).detach() for (n, p), g in zip(w.items(), grad_q_w)}
    for _ in range(k - 1):
        w_k = {n: p.requires_grad_() for n, p in w_k.items()}
        g = torch.autograd.grad(lower(lookahead_forward(model, w_k, noisy.x)), list(w_k.values()), retain_graph=True)
        w_k = {n: (p - lr * gi).detach() for (n, p), gi in zip(w_k.items(), g)}
    Q = lower(logits) - lower(lookahead_forward(model, w_k, noisy.x))
    grad_q_alpha = torch.autograd.grad(Q, alpha)

    logits_c, h_c = model(clean.x, return_features=True)  # real forward
    p_f = logits_c.softmax(1).gather(1, clean.y[:, None]).squeeze(1)
    p_g = corrected(meta, h_c.detach(), clean.y).gather(1, clean.y[:, None]).squeeze(1)
    upper = -torch.log(rho * p_f + (1 - rho) * p_g).mean()
    grad_f = torch.autograd.grad(upper, list(w.values()) + alpha, allow_unused=True)
    grad_f_w, grad_f_alpha = grad_f[: len(w)], grad_f[len(w):]
    grad_f_alpha = [torch.zeros_like(a) if g is None else g for a, g in zip(alpha, grad_f_alpha)]

    norm_q = flat(grad_q_w).square().sum() + flat(grad_q_alpha).square().sum()
    beta = max(delta - float(flat(grad_f_w) @ flat(grad_q_w)) / float(norm_q), 0.0)
    for p, gf, gq in zip(w.values(), grad_f_w, grad_q_w):
        p.grad = gf + xi * beta * gq
    for a, gf, gq in zip(alpha, grad_f_alpha, grad_q_alpha):
        a.grad = gf + xi * beta * gq
    opt.step()
    meta_opt.step()
    return model, meta, beta


@pytest.mark.parametrize("delta", [0.25, 3.0])
def test_ebomlc_step_equals_algorithm_2(delta):
    method = make_method("ebomlc", delta=delta)
    noisy, clean = _batch(1, 10), _batch(2, 6)
    model, meta, beta = barrier_reference_step(method, noisy, clean, k=1, rho=0.2, xi=0.5, delta=delta)
    out = method.train_step(noisy, clean)
    assert out.stats["beta"].item() == pytest.approx(beta, rel=1e-9, abs=1e-12)
    if delta == 3.0:
        assert beta > 0  # the barrier term is exercised
    assert out.stats["skipped"].item() == 0
    assert_same_state(method, model, meta)


def test_mlc_d_step_equals_algorithm_1():
    method = make_method("mlc-d", delta=3.0)
    assert method.inner_steps == 5
    noisy, clean = _batch(3, 10), _batch(4, 6)
    model, meta, beta = barrier_reference_step(method, noisy, clean, k=5, rho=1.0, xi=1.0, delta=3.0)
    assert beta > 0
    out = method.train_step(noisy, clean)
    assert out.stats["beta"].item() == pytest.approx(beta, rel=1e-9)
    assert_same_state(method, model, meta)


def test_mlc_hypergradient_matches_finite_differences():
    """∇_α F(w_k(α)) through k=2 unrolled SGD steps with momentum and weight decay, against a
    central difference of a hand-unrolled F(w_k(α)) along a random direction."""
    method = make_method("mlc", inner_steps=2)
    noisy, clean = _batch(5, 10), _batch(6, 6)
    model = copy.deepcopy(method.model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs0 = {n: method.opt.state[p]["momentum_buffer"].clone() for n, p in method.named.items()}
    with torch.no_grad():
        _, h = lookahead_forward(model, w0, noisy.x, features=True)
    names = [n for n, _ in method.meta.named_parameters()]
    alpha0 = [p.detach().clone() for p in method.meta.parameters()]

    def upper_after_unroll(alpha):
        t = functional_call(method.meta, dict(zip(names, alpha)), (h, noisy.y)).softmax(1)
        w, bufs = dict(w0), dict(bufs0)
        for _ in range(2):
            w = {n: p.detach().requires_grad_() for n, p in w.items()}
            loss = -(t.detach() * lookahead_forward(model, w, noisy.x).log_softmax(1)).sum(1).mean()
            g = dict(zip(w, torch.autograd.grad(loss, list(w.values()))))
            with torch.no_grad():
                bufs = {n: 0.9 * bufs[n] + g[n] + 5e-4 * w[n] for n in w}
                w = {n: w[n] - 0.1 * bufs[n] for n in w}
        return F.cross_entropy(lookahead_forward(model, w, clean.x), clean.y)

    # upper_after_unroll uses α by value only (t is detached), so the difference quotient
    # owes nothing to the method's autograd
    _, _, upper, hypergrad, _ = method.gradients(noisy, clean)
    assert upper.item() == pytest.approx(upper_after_unroll(alpha0).item(), rel=1e-10)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        v = [torch.randn(a.shape, generator=g) for a in alpha0]
        eps = 1e-5
        plus = upper_after_unroll([a + eps * d for a, d in zip(alpha0, v)])
        minus = upper_after_unroll([a - eps * d for a, d in zip(alpha0, v)])
        numeric = (plus - minus).item() / (2 * eps)
        analytic = float(flat(hypergrad) @ flat(v))
        assert abs(analytic) > 1e-6
        assert analytic == pytest.approx(numeric, rel=1e-5)


def test_mlc_step_applies_lower_gradient_and_hypergradient():
    method = make_method("mlc")
    noisy, clean = _batch(8, 10), _batch(9, 6)
    model, meta, opt, meta_opt = clone_state(method)
    _, grads, _, hypergrad, _ = copy.deepcopy(method).gradients(noisy, clean)
    with torch.no_grad():
        model(noisy.x)  # the real forward's BN update
    for p, g in zip(model.parameters(), grads):
        p.grad = g.detach().clone()
    for p, g in zip(meta.parameters(), hypergrad):
        p.grad = g.clone()
    opt.step()
    meta_opt.step()
    method.train_step(noisy, clean)
    assert_same_state(method, model, meta)


def test_mlc_mix_clean_splits_the_trusted_batch_like_the_reference_code():
    """--mix-clean: G = (10 G_noisy + 3 CE(second trusted half)) / 13 drives the look-ahead,
    F(w_1) is measured on the first half."""
    method = make_method("mlc", mix_clean=True)
    noisy, clean = _batch(16, 10), _batch(17, 6)
    model = copy.deepcopy(method.model)
    w0 = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    bufs = {n: method.opt.state[p]["momentum_buffer"] for n, p in method.named.items()}
    logits, h = lookahead_forward(model, w0, noisy.x, features=True)
    t = corrected(method.meta, h.detach(), noisy.y).detach()
    mixed = F.cross_entropy(lookahead_forward(model, w0, clean.x[3:]), clean.y[3:])
    expected_lower = (10 * -(t * logits.log_softmax(1)).sum(1).mean() + 3 * mixed) / 13
    g = dict(zip(w0, torch.autograd.grad(expected_lower, list(w0.values()))))
    w1 = {n: (w0[n] - 0.1 * (0.9 * bufs[n] + g[n] + 5e-4 * w0[n])).detach() for n in w0}
    expected_upper = F.cross_entropy(lookahead_forward(model, w1, clean.x[:3]), clean.y[:3])

    lower, _, upper, _, _ = method.gradients(noisy, clean)
    assert lower.item() == pytest.approx(expected_lower.item(), rel=1e-12)
    assert upper.item() == pytest.approx(expected_upper.item(), rel=1e-12)


@pytest.mark.parametrize(
    "name,options,real_forwards", [("mlc", {}, 1), ("mlc", {"mix_clean": True}, 2), ("mlc-d", {}, 2), ("ebomlc", {}, 2)]
)
def test_only_real_forwards_update_bn_running_stats(name, options, real_forwards):
    """Running statistics after a step equal those of running the model in train mode on the
    real update's batches only: the noisy batch, then (barrier methods) the trusted batch or
    (mlc --mix-clean) the trusted batch's second half."""
    method = make_method(name, **options)
    noisy, clean = _batch(10, 10), _batch(11, 6)
    clean_x = clean.x[3:] if options.get("mix_clean") else clean.x
    expected = copy.deepcopy(method.model).train()
    with torch.no_grad():
        for x in [noisy.x, clean_x][:real_forwards]:
            expected(x)
    method.train_step(noisy, clean)
    got = dict(method.model.named_buffers())
    for n, b in expected.named_buffers():
        torch.testing.assert_close(got[n], b, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.parametrize("read_ok", [None, False], ids=["cpu-reads-flag", "device-style-restore"])
@pytest.mark.parametrize("name", ["mlc", "mlc-d", "ebomlc"])
def test_non_finite_step_is_skipped_and_counted(name, read_ok):
    """Both strategies of SkippableStep: the CPU's (read the flag, do not step) and the one used
    on accelerators (step, then restore on the device with torch.where)."""
    method = make_method(name)
    method.stepper.read_ok = read_ok
    if read_ok is False and hasattr(method, "ops"):
        # CUDA's barrier_combine_ records a non-finite output instead of raising as the CPU's does
        from nrcore import ops
        from nrcore.ops import reference

        method.ops = SimpleNamespace(
            barrier_stats=ops.barrier_stats, barrier_coefficient=ops.barrier_coefficient, barrier_combine_=reference.barrier_combine_
        )
    before = copy.deepcopy((method.model.state_dict(), method.meta.state_dict(), method.opt.state_dict(), method.meta_opt.state_dict()))
    noisy = _batch(12, 10)
    noisy.x[3, 0, 2, 2] = float("nan")
    out = method.train_step(noisy, _batch(13, 6))
    assert out.stats["skipped"].item() == 1
    params = [p for p in method.model.parameters()] + [p for p in method.meta.parameters()]
    assert all(torch.isfinite(p).all() for p in params)
    after = (method.model.state_dict(), method.meta.state_dict(), method.opt.state_dict(), method.meta_opt.state_dict())
    torch.testing.assert_close(after[2]["state"], before[2]["state"], rtol=0, atol=0)
    torch.testing.assert_close(after[3]["state"], before[3]["state"], rtol=0, atol=0)
    for got, want in zip(after[1].values(), before[1].values()):
        assert torch.equal(got, want)
    for n, want in before[0].items():  # parameters and BN running statistics
        assert torch.equal(after[0][n], want), n
    # and the next finite step proceeds normally
    assert method.train_step(_batch(14, 10), _batch(15, 6)).stats["skipped"].item() == 0
