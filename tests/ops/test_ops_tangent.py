"""tangent_dot / tangent_kernel vs the twin (both contraction strategies, layouts, shapes) and
PerSampleGradRecorder vs torch.func per-example gradients (vmap(grad))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from nrcore import ops
from nrcore.ops import reference as ref

SHAPES = [  # B, T, p, q, k, M, S
    (1, 1, 1, 1, 1, 1, 1),
    (7, 1, 13, 5, 1, 4, 1),  # nn.Linear
    (6, 9, 8, 4, 3, 5, 9),
    (3, 20, 30, 7, 2, 2, 11),  # T != S
    (40, 16, 36, 16, 11, 30, 16),  # conv-like, k = C + 1
    (300, 1, 70, 10, 1, 260, 1),  # several ghost blocks / threads
    (5, 4, 96, 64, 3, 4, 2),  # q p = 6144: CUDA splits the long K of the explicit contractions
    (1, 3, 1100, 3, 2, 2, 2),  # one example, p = 1100: CUDA splits K of the ghost products too
]


@pytest.mark.parametrize("strategy", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tangent_ops_match_twin(device, dtype, layout, relayout, check_close, gen, strategy, shape):
    B, T, p, q, k, M, S = shape
    make = lambda *s: relayout(torch.randn(*s, generator=gen).to(device=device, dtype=dtype), layout)  # noqa: E731
    acts, grads, D = make(B, T, p), make(B, T, q), make(k, q, p)
    acts_b, grads_b = make(M, S, p), make(M, S, q)
    got = ops.tangent_dot(acts, grads, D, strategy=strategy)
    assert got.shape == (B, k)
    check_close(got, ref.tangent_dot(acts, grads, D), dtype, scale=(T * p * q) ** 0.5 * 4)
    single = ops.tangent_dot(acts, grads, D[0], strategy=strategy)
    assert single.shape == (B,)
    check_close(single, got[:, 0], dtype, scale=(T * p * q) ** 0.5 * 4)
    K = ops.tangent_kernel(acts, grads, acts_b, grads_b, strategy=strategy)
    assert K.shape == (B, M)
    check_close(K, ref.tangent_kernel(acts, grads, acts_b, grads_b), dtype, scale=(T * S * p * q) ** 0.5 * 4)


def test_tangent_explicit_chunks_beyond_the_memory_budget(gen):
    """q*p above the explicit path's per-chunk budget: one example per chunk, side b recomputed."""
    B, T, p, q = 3, 2, 2100, 2050
    acts, grads = torch.randn(B, T, p, generator=gen), torch.randn(B, T, q, generator=gen)
    D = torch.randn(2, q, p, generator=gen)
    a64, g64 = acts.double(), grads.double()  # float32 sums of 4M terms: compare with the exact answer
    scale = (T * p * q) ** 0.5 * 4
    got = ops.tangent_dot(acts, grads, D, strategy="explicit").double()
    torch.testing.assert_close(got, ref.tangent_dot(a64, g64, D.double()), rtol=1e-4, atol=1e-4 * scale)
    K = ops.tangent_kernel(acts, grads, acts[:2], grads[:2], strategy="explicit").double()
    torch.testing.assert_close(K, ref.tangent_kernel(a64, g64, a64[:2], g64[:2]), rtol=1e-5, atol=1e-4 * T * scale)


def test_tangent_empty_dims_give_zeros():
    assert ops.tangent_dot(torch.zeros(0, 3, 4), torch.zeros(0, 3, 2), torch.zeros(2, 4)).shape == (0,)
    torch.testing.assert_close(ops.tangent_dot(torch.ones(2, 0, 4), torch.ones(2, 0, 2), torch.ones(2, 4)), torch.zeros(2))
    torch.testing.assert_close(ops.tangent_kernel(torch.ones(2, 0, 4), torch.ones(2, 0, 2), torch.ones(3, 1, 4), torch.ones(3, 1, 2)), torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# PerSampleGradRecorder vs torch.func
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 16), nn.Linear(16, 8, bias=False), nn.Linear(8, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.relu_(self.fc1(x)))))  # in-place ReLU on a recorded output


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, dilation=2, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.conv3 = nn.Conv2d(5, 4, (2, 3), stride=(1, 2), padding="valid")
        self.fc = nn.Linear(4 * 4 * 2, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.relu(self.conv3(x)).flatten(1))


def torch_func_per_sample(model, x, y, names=None):
    """{name: [B, *shape]} per-example gradients of cross-entropy via vmap(grad)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    out = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {n: g for n, g in out.items() if names is None or n in names}


def record(model, x, y, layers=None):
    rec = ops.PerSampleGradRecorder(model, layers)
    with rec.record():
        F.cross_entropy(model(x), y, reduction="none").sum().backward()
    return rec


def flat(grads, names):
    return torch.cat([grads[n].flatten(1) for n in names], 1)


@pytest.mark.parametrize("make_model,shape", [(MLP, (12,)), (SmallCNN, (3, 9, 10))], ids=["mlp", "cnn"])
def test_recorder_matches_torch_func(device, make_model, shape):
    torch.manual_seed(0)
    model = make_model().double().to(device).eval()  # BatchNorm in eval mode: exact per-example gradients
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine parameters
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(7, *shape, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (7,), device=device)
    expected = torch_func_per_sample(model, x, y)
    names = list(expected)
    rec = record(model, x, y)
    assert sorted(rec.parameters) == sorted(names)
    got = rec.per_sample_grads()
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
    G = flat(expected, names)

    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    want = G @ flat({n: d[None] for n, d in direction.items()}, names)[0]
    torch.testing.assert_close(rec.dot(direction), want, rtol=1e-9, atol=1e-10)
    by_param = {p: direction[n] for n, p in model.named_parameters()}
    torch.testing.assert_close(rec.dot(by_param), want, rtol=1e-9, atol=1e-10)

    dirs = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    want_many = torch.stack([G @ flat({n: d[None] for n, d in dd.items()}, names)[0] for dd in dirs], 1)
    torch.testing.assert_close(rec.dot_many(dirs), want_many, rtol=1e-9, atol=1e-10)
    stacked = {n: torch.stack([dd[n] for dd in dirs]) for n in names}
    torch.testing.assert_close(rec.dot_many(stacked), want_many, rtol=1e-9, atol=1e-10)

    streaming = ops.PerSampleGradRecorder(model)
    with streaming.record(directions=dirs):
        F.cross_entropy(model(x), y, reduction="none").sum().backward()
    torch.testing.assert_close(streaming.streamed(), want_many, rtol=1e-9, atol=1e-10)
    assert all(not layer.uses for layer in streaming._layers)  # nothing kept
    with pytest.raises(RuntimeError, match="keeps nothing but streamed"):
        streaming.kernel()

    torch.testing.assert_close(rec.kernel(), G @ G.T, rtol=1e-9, atol=1e-10)
    x2, y2 = torch.randn(4, *shape, dtype=torch.float64, device=device), torch.randint(0, 5, (4,), device=device)
    rec2 = record(model, x2, y2)
    G2 = flat(torch_func_per_sample(model, x2, y2), names)
    torch.testing.assert_close(rec.kernel(rec2), G @ G2.T, rtol=1e-9, atol=1e-10)
    streaming = ops.PerSampleGradRecorder(model)
    with streaming.record(kernel_with=rec):
        F.cross_entropy(model(x2), y2, reduction="none").sum().backward()
    torch.testing.assert_close(streaming.streamed(), G2 @ G.T, rtol=1e-9, atol=1e-10)

    w = torch.rand(7, dtype=torch.float64, device=device)
    summed = rec.weighted_sum(w)
    for n in names:
        torch.testing.assert_close(summed[n], torch.einsum("b,b...->...", w, expected[n]), rtol=1e-9, atol=1e-12)


def test_recorder_float32_uses_compiled_products():
    torch.manual_seed(1)
    model = SmallCNN().eval()
    x, y = torch.randn(9, 3, 9, 10), torch.randint(0, 5, (9,))
    expected = torch_func_per_sample(model, x, y)
    names = list(expected)
    G = flat(expected, names)
    rec = record(model, x, y)
    torch.testing.assert_close(rec.kernel(), G @ G.T, rtol=1e-4, atol=1e-4 * float(G.norm(dim=1).max()) ** 2)


def test_recorder_subset_of_layers_and_containers():
    from nrcore.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet32", (3, 8, 8), 10).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [model.layer3[4], model.classifier]
    for m in chosen:
        for p in m.parameters():
            p.requires_grad_(True)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    rec = record(model, x, y, layers=chosen)
    names = sorted(rec.parameters)
    assert names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = torch_func_per_sample(model, x, y, names)
    got = rec.per_sample_grads()
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
    G = flat(expected, names)
    torch.testing.assert_close(rec.kernel(), G @ G.T, rtol=1e-9, atol=1e-12)


def test_recorder_train_mode_batchnorm_holds_batch_statistics_constant():
    """Train-mode BatchNorm: g_i is the gradient of l_i with the batch statistics held fixed,
    i.e. eval-mode BatchNorm whose running statistics are the batch's."""
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    x, y = torch.randn(6, 3, 9, 10, dtype=torch.float64), torch.randint(0, 5, (6,))
    frozen, plain = copy.deepcopy(model), copy.deepcopy(model)
    plain(x)  # one ordinary training forward, to compare running statistics with
    stats = {}

    def grab(name):
        def hook(module, inputs, output):
            var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
            stats[name] = (mean.detach(), var.detach())

        return hook

    handles = [m.register_forward_hook(grab(n)) for n, m in frozen.named_modules() if isinstance(m, nn.BatchNorm2d)]
    frozen(x)
    for h in handles:
        h.remove()
    for n, m in frozen.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(stats[n][0])
            m.running_var.copy_(stats[n][1])
    frozen.eval()
    expected = torch_func_per_sample(frozen, x, y)
    rec = record(model, x, y)
    got = rec.per_sample_grads()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
        # the backward ran in the same convention: .grad is the sum of the per-example gradients
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, expected[n].sum(0), rtol=1e-9, atol=1e-12)
    # the recorded forward updated the running statistics exactly as an ordinary one does
    for (n, buf), (_, want) in zip(model.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12, msg=n)


def test_recorder_shared_layer_and_sequence_inputs():
    """A Linear applied twice (weight sharing) and a Linear on [B, L, in] inputs."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # x: [B, L, 4]
            return self.head(self.lin(torch.tanh(self.lin(x))).mean(1))

    torch.manual_seed(0)
    model = Shared().double()
    x, y = torch.randn(5, 6, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    expected = torch_func_per_sample(model, x, y)
    names = list(expected)
    rec = record(model, x, y)
    got = rec.per_sample_grads()
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
    G = flat(expected, names)
    torch.testing.assert_close(rec.kernel(), G @ G.T, rtol=1e-9, atol=1e-12)
    d = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    torch.testing.assert_close(rec.dot(d), G @ flat({n: v[None] for n, v in d.items()}, names)[0], rtol=1e-9, atol=1e-12)


def test_recorder_errors():
    with pytest.raises(ValueError, match=r"emb\.weight \(Embedding\)"):
        ops.PerSampleGradRecorder(nn.Sequential(nn.Linear(3, 3), nn.ModuleDict({"emb": nn.Embedding(4, 3)})))
    with pytest.raises(ValueError, match=r"'0'.*groups=2"):
        ops.PerSampleGradRecorder(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(TypeError, match=r"'1' \(LayerNorm\) is not supported"):
        model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
        ops.PerSampleGradRecorder(model, layers=[model[1]])
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        ops.PerSampleGradRecorder(nn.Linear(2, 2), layers=["nope"])
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    rec = ops.PerSampleGradRecorder(model)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        rec.dot({})
    x = torch.randn(5, 3)
    with rec.record():
        model(x).sum().backward()
    with pytest.raises(ValueError, match="not a recorded parameter"):
        rec.dot({"2.weight": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"direction\['1.weight'\] has shape \(4, 2\)"):
        rec.dot({"1.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="weights must be a"):
        rec.weighted_sum(torch.ones(3))
    # recorded parameters missing from a direction count as zero
    d = torch.randn(2, 4)
    torch.testing.assert_close(rec.dot({"1.weight": d}), rec.per_sample_grads()["1.weight"].flatten(1) @ d.flatten())
    model2 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    rec2 = ops.PerSampleGradRecorder(model2)
    inp = torch.randn(4, 3)
    with rec2.record():
        h = model2[0](inp)
        out = model2[1](h)
        out.sum().backward()
    with torch.no_grad():
        h.add_(1.0)  # in-place edit of a recorded input
    with pytest.raises(RuntimeError, match="modified in place"):
        rec2.per_sample_grads()


def test_recorder_backwards_inside_and_after_the_block():
    """Two backwards through one forward inside the block: Linear layers sum both gradients; a
    BatchNorm layer (inputs dropped at the first backward) and a streaming recording name the
    layer and raise. A backward after the block leaves the recording alone."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    linear = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()

    def grads(model, heads, **stream):
        rec = ops.PerSampleGradRecorder(model)
        with rec.record(**stream):
            out = model(x)
            for h in heads:
                out[:, h].sum().backward(retain_graph=True)
        return rec

    both = grads(linear, [0, 1]).per_sample_grads()
    first, second = grads(linear, [0]).per_sample_grads(), grads(linear, [1]).per_sample_grads()
    for name in both:
        torch.testing.assert_close(both[name], first[name] + second[name])

    with_bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    with pytest.raises(RuntimeError, match=r"layer '1' got a second backward"):
        grads(with_bn, [0, 1])

    # A backward after the block (the real step through a kept graph) changes nothing.
    for model in (linear, with_bn):
        rec = ops.PerSampleGradRecorder(model)
        with rec.record():
            out = model(x)
            out[:, 0].sum().backward(retain_graph=True)
        out[:, 1].sum().backward()
        want = grads(model, [0]).per_sample_grads()
        for name, g in rec.per_sample_grads().items():
            torch.testing.assert_close(g, want[name])
    dirs = [{n: torch.randn_like(p) for n, p in linear.named_parameters()}]
    with pytest.raises(RuntimeError, match="got a second backward"):
        grads(linear, [0, 1], directions=dirs)


def test_recorder_joint_batchnorm_keeps_the_training_graph():
    """batchnorm='joint': BatchNorm's backward is untouched (.grad equals an ordinary backward's)
    and the recorded per-example slices sum to that batch gradient."""
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    x, y = torch.randn(6, 3, 9, 10, dtype=torch.float64), torch.randint(0, 5, (6,))
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y, reduction="none").sum().backward()
    rec = ops.PerSampleGradRecorder(model, batchnorm="joint")
    with rec.record():
        F.cross_entropy(model(x), y, reduction="none").sum().backward()
    per_example = rec.per_sample_grads()
    G = torch.cat([per_example[n].flatten(1) for n in sorted(per_example)], 1)
    torch.testing.assert_close(rec.kernel(), G @ G.T, rtol=1e-9, atol=1e-10)
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
        torch.testing.assert_close(per_example[n].sum(0), q.grad, rtol=1e-9, atol=1e-12, msg=n)
    with pytest.raises(ValueError, match="batchnorm must be 'constant' or 'joint'"):
        ops.PerSampleGradRecorder(model, batchnorm="frozen")


CONV_GEOMETRIES = [  # C, H, W, q, kernel, stride, padding, dilation
    (3, 9, 10, 5, (3, 3), (2, 2), (1, 1), (1, 1)),
    (4, 7, 8, 6, (2, 3), (1, 2), (0, 1), (2, 1)),
    (2, 5, 5, 3, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1
    (3, 4, 6, 2, (3, 3), (1, 1), (2, 2), (1, 1)),  # padding wider than the image edge
    (20, 6, 6, 40, (3, 3), (1, 1), (1, 1), (1, 1)),  # several register tiles each way
]


@pytest.mark.parametrize("strategy", ["auto", "ghost", "explicit"])
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: "-".join(map(str, g[:4])))
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_conv_tangent_ops_match_twin(device, dtype, check_close, gen, strategy, geometry, memory_format):
    C, H, W, q, ks, st, pd, dl = geometry
    kw = dict(kernel_size=ks, stride=st, padding=pd, dilation=dl)
    Ho, Wo = ((H + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1, (W + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    make = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731
    x, g, x2, g2 = make(5, C, H, W), make(5, q, Ho, Wo), make(4, C, H, W), make(4, q, Ho, Wo)
    D = torch.randn(3, q, C, *ks, generator=gen).to(device=device, dtype=dtype)
    scale = (Ho * Wo * C * ks[0] * ks[1] * q) ** 0.5 * 4
    got = ops.conv_tangent_dot(x, g, D, strategy=strategy, **kw)
    check_close(got, ref.conv_tangent_dot(x, g, D, **kw), dtype, scale=scale)
    check_close(ops.conv_tangent_dot(x, g, D[0], strategy=strategy, **kw), got[:, 0], dtype, scale=scale)
    K = ops.conv_tangent_kernel(x, g, x2, g2, strategy=strategy, **kw)
    check_close(K, ref.conv_tangent_kernel(x, g, x2, g2, **kw), dtype, scale=scale * 4)


def test_conv_tangent_errors():
    x, g = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"conv_tangent_dot: grads has shape \(2, 4, 5, 5\) but the convolution"):
        ops.conv_tangent_dot(x, g, torch.randn(4, 3, 3, 3), kernel_size=3)
    with pytest.raises(ValueError, match="direction must be shaped like the weight"):
        ops.conv_tangent_dot(x, g, torch.randn(4, 3, 2, 2), kernel_size=3, padding=1)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        ops.conv_tangent_dot(x, g, torch.randn(4, 3, 3, 3), kernel_size=3, padding=1, stride=1.5)
    with pytest.raises(ValueError, match="conv_tangent_kernel: the two batches must come from the same layer"):
        ops.conv_tangent_kernel(x, g, torch.randn(2, 2, 5, 5), g, kernel_size=3, padding=1)
