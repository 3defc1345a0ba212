"""nrcore.ops benchmark: every compiled op against its pure-PyTorch twin (nrcore.ops.reference),
plus the baselines issue 2 names, one table per op family, all measured in one run.

    python bench/ops.py                      # CPU, all sections
    python bench/ops.py --only fbr,barrier   # a subset
    python bench/ops.py --device cuda        # the same tables on a GPU

Timing. Every contender is a zero-argument callable on inputs built beforehand. Each timed
sample runs a contender enough times to last about --sample-ms; samples are interleaved (each
round runs every contender of a row once, in a rotated order) and the table shows the median of
--reps rounds, so background load on this shared 2-core machine hits all contenders alike. CUDA
samples synchronise before reading the clock. "ratio" is baseline time / nrcore time (above 1:
nrcore is faster).

Rows:
  fbr        fbr_direction at B=128, m=2000, d in {64, 512}, C in {10, 100} against its twin (the
             closed form in PyTorch) and against the paper-literal Algorithm 1 (explicit B x m
             centred Gram, per-class means, shift, mask, row sum; the clean mean and Gram are
             per batch, as written); fbr_prepare and fbr_update_ against twins. (centered_gram is
             not a compiled op: it is one BLAS GEMM and runs its twin.)
  barrier    barrier_stats / barrier_coefficient / barrier_combine_ on gradient lists shaped like
             ResNet-32 (0.46M parameters) and ResNet-34 (21M) against their twins (per-tensor
             loops, float64 accumulation) and, for barrier_stats, a plain float32 per-tensor loop.
  tangent    ResNet-32 (eval mode) last stage + classifier, B = 128 CIFAR images, tangent
             features r.f(x) as fbr-ntk uses them: (a) dots with C + 1 = 11 directions and (b)
             the B x 128 kernel against a second batch, computed by torch.func per-example
             gradients (vmap(grad), then a matrix product) and by nrcore (PerSampleGradRecorder
             + tangent_dot / tangent_kernel). The frozen first two stages are run once outside
             the timing; both contenders start from their output. Also the compiled tangent ops
             against their twins on the recorded per-layer inputs.

Peak memory (tangent rows). Each contender runs in a fresh subprocess (this script with
--probe), so nothing one contender allocates or caches can hide another's. After building the
model and inputs, the subprocess runs one warm-up forward/backward on a different batch (so
both contenders find the libraries initialised), then measures the contender's first call.
CPU: peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs) minus the resident
size just before the call; glibc is told to unmap freed blocks at once
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0) so the resident size follows live
memory, and nrcore's own scratch-buffer cache is included because it fills during that call.
CUDA: torch.cuda.max_memory_allocated minus memory allocated before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, reps: int, sample_ms: float):
        self.device, self.reps, self.sample_s = device, reps, sample_ms / 1000.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calls_per_sample(self, fn: Callable) -> int:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - t0, 1e-7)
        return max(1, min(10000, int(self.sample_s / once)))

    def compare(self, contenders: Dict[str, Callable]) -> Dict[str, float]:
        """Median seconds per call of each contender, rounds interleaved in rotating order."""
        for fn in contenders.values():  # warm-up (lazy initialisation, caches)
            fn()
        calls = {name: self._calls_per_sample(fn) for name, fn in contenders.items()}
        names = list(contenders)
        samples: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(self.reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                fn, n = contenders[name], calls[name]
                self.sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                self.sync()
                samples[name].append((time.perf_counter() - t0) / n)
        return {n: statistics.median(s) for n, s in samples.items()}


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.3f} s "


def fmt_bytes(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:8.1f} MiB"


# Peak memory bandwidth (GB/s) of GPUs by the name torch reports, for the "% of peak" column;
# --peak-gbs overrides (and covers any other device).
PEAK_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "A100-SXM4-80GB": 2039.0,
            "A100 80GB PCIe": 1935.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0, "L40S": 864.0, "A10": 600.0}


def peak_bandwidth_gbs(device: torch.device, override: Optional[float]) -> Optional[float]:
    """The device's peak memory bandwidth in GB/s: `override`, else the table's entry whose
    name the CUDA device's name contains; None on the CPU or for an unknown GPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


class Table:
    """Rows of one op family. A row given `bytes_moved` (what the op must read and write at
    least) also shows nrcore's achieved bandwidth, and with a known `peak_gbs` its share of it."""

    peak_gbs: Optional[float] = None  # set by main for the run's device

    def __init__(self, title: str, memory: bool = False):
        self.title, self.memory, self.rows = title, memory, []

    def add(self, op: str, shape: str, baseline: str, t_base: float, t_nrcore: float, m_base=None, m_nrcore=None, bytes_moved=None):
        self.rows.append((op, shape, baseline, t_base, t_nrcore, m_base, m_nrcore, bytes_moved))

    def print(self):
        print(f"\n## {self.title}\n")
        head = f"| {'op':<18} | {'shape':<34} | {'baseline':<22} | {'baseline':>11} | {'nrcore':>11} | {'ratio':>7} |"
        bandwidth = any(row[-1] for row in self.rows)
        if bandwidth:
            head += f" {'nrcore GB/s':>11} | {'% of peak':>9} |"
        if self.memory:
            head += f" {'base peak':>12} | {'nrcore peak':>12} | {'mem ratio':>9} |"
        print(head)
        print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        for op, shape, base, tb, tn, mb, mn, moved in self.rows:
            line = f"| {op:<18} | {shape:<34} | {base:<22} | {fmt_time(tb):>11} | {fmt_time(tn):>11} | {tb / tn:6.1f}x |"
            if bandwidth:
                gbs = moved / tn / 1e9 if moved else None
                share = f"{100 * gbs / self.peak_gbs:8.1f}%" if gbs and self.peak_gbs else "-"
                line += f" {(f'{gbs:11.1f}' if gbs else '-'):>11} | {share:>9} |"
            if self.memory:
                ratio = f"{mb / mn:8.1f}x" if mb and mn else "-"
                line += f" {fmt_bytes(mb):>12} | {fmt_bytes(mn):>12} | {ratio:>9} |"
            print(line)


def nbytes(*tensors) -> int:
    """Bytes of tensors and lists of tensors."""
    return sum(nbytes(*t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# FBR
# ---------------------------------------------------------------------------------------------


def bench_fbr(timer: Timer, device: torch.device, goals: List[str]) -> Table:
    from nrcore import ops
    from nrcore.ops import reference as ref

    table = Table("FBR (closed form of Algorithm 1)")
    g = torch.Generator().manual_seed(0)
    B, m = 128, 2000
    for d in (64, 512):
        for C in (10, 100):
            clean = (torch.randn(m, d, generator=g) + 0.5).relu().to(device)  # ReLU-like features
            clean_labels = (torch.arange(m) % C).to(device)
            feats = (torch.randn(B, d, generator=g) + 0.5).relu().to(device)
            labels = torch.randint(0, C, (B,), generator=g).to(device)
            stats = ops.fbr_prepare(clean, clean_labels, C)
            t = timer.compare({
                "nrcore": lambda: ops.fbr_direction(feats, labels, stats),
                "twin": lambda: ref.fbr_direction(feats, labels, stats),
                "literal": lambda: ref.fbr_direction_literal(feats, labels, clean, clean_labels, C),
            })
            shape = f"B={B} m={m} d={d} C={C}"
            moved = nbytes(feats, labels, stats.basis_t, stats.mean) + B * feats.element_size()  # reads + the [B] output
            table.add("fbr_direction", shape, "twin (closed form)", t["twin"], t["nrcore"], bytes_moved=moved)
            table.add("fbr_direction", shape, "paper-literal Alg. 1", t["literal"], t["nrcore"], bytes_moved=moved)
            if d == 512 and C == 10:
                goals.append(goal("FBR vs paper-literal at d=512, C=10", t["literal"] / t["nrcore"], 20.0))
    d, C = 512, 10
    clean = torch.randn(m, d, generator=g).to(device)
    clean_labels = (torch.arange(m) % C).to(device)
    t = timer.compare({
        "nrcore": lambda: ops.fbr_prepare(clean, clean_labels, C),
        "twin": lambda: ref.fbr_prepare(clean, clean_labels, C),
    })
    table.add("fbr_prepare", f"m={m} d={d} C={C}", "twin", t["twin"], t["nrcore"], bytes_moved=nbytes(clean, clean_labels))
    n = 50000
    weights = torch.full((n,), 0.5, device=device)
    index = torch.randperm(n, generator=g)[:B].to(device)
    direction = (torch.randn(B, generator=g) * 1e-3).to(device)
    t = timer.compare({
        "nrcore": lambda: ops.fbr_update_(weights, index, direction, 0.1),
        "twin": lambda: ref.fbr_update_(weights, index, direction, 0.1),
    })
    table.add("fbr_update_", f"n={n} B={B}", "twin", t["twin"], t["nrcore"],
              bytes_moved=nbytes(index, direction) + 2 * B * weights.element_size())  # the B weights read and written
    return table


# ---------------------------------------------------------------------------------------------
# barrier
# ---------------------------------------------------------------------------------------------


def gradient_shapes(model_name: str, num_classes: int = 10):
    """Parameter shapes of the main model and of an MLC meta model on top of it."""
    from nrcore.models import build_model

    model = build_model(model_name, (3, 32, 32), num_classes)
    main = [tuple(p.shape) for p in model.parameters()]
    h = model.feature_dim
    meta = [(num_classes, 128), (128, h + 128), (128,), (128, 128), (128,), (num_classes, 128), (num_classes,)]
    return main, meta


def fp32_loop_stats(f, q, a):
    """The obvious per-tensor loop, accumulating in the gradients' precision."""
    dot = sum(torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(f, q))
    sq_w = sum(torch.dot(y.reshape(-1), y.reshape(-1)) for y in q)
    sq_a = sum(torch.dot(y.reshape(-1), y.reshape(-1)) for y in a)
    return dot, sq_w, sq_a


def bench_barrier(timer: Timer, device: torch.device, goals: List[str]) -> Table:
    from nrcore import ops
    from nrcore.ops import reference as ref

    table = Table("Barrier reductions (MLC-D / EBOMLC)")
    g = torch.Generator().manual_seed(0)
    for model_name in ("resnet32", "resnet34"):
        main, meta = gradient_shapes(model_name)
        make = lambda shapes: [torch.randn(s, generator=g).to(device) for s in shapes]  # noqa: E731
        f, q, a = make(main), make(main), make(meta)
        params = sum(x.numel() for x in f)
        shape = f"{model_name} {len(f)} tensors {params / 1e6:.2f}M"
        t = timer.compare({
            "nrcore": lambda: ops.barrier_stats(f, q, a),
            "twin": lambda: ref.barrier_stats(f, q, a),
            "fp32": lambda: fp32_loop_stats(f, q, a),
        })
        table.add("barrier_stats", shape, "twin (fp64 loop)", t["twin"], t["nrcore"], bytes_moved=nbytes(f, q, a))
        table.add("barrier_stats", shape, "fp32 per-tensor loop", t["fp32"], t["nrcore"], bytes_moved=nbytes(f, q, a))
        if model_name == "resnet34":
            goals.append(goal("barrier_stats vs per-tensor loop on the 21M list", t["twin"] / t["nrcore"], 2.0))
            goals.append(goal("barrier_stats vs float32 per-tensor loop on the 21M list", t["fp32"] / t["nrcore"], 2.0))
        stats = ops.barrier_stats(f, q, a)
        if model_name == "resnet32":
            t = timer.compare({
                "nrcore": lambda: ops.barrier_coefficient(stats, 0.25),
                "twin": lambda: ref.barrier_coefficient(stats, 0.25),
            })
            table.add("barrier_coefficient", "[4]", "twin", t["twin"], t["nrcore"])
        coef = ops.barrier_coefficient(stats, 0.25) * 0.5
        outs = [torch.empty_like(x) for x in f]
        t = timer.compare({
            "nrcore": lambda: ops.barrier_combine_(outs, f, q, coef),
            "twin": lambda: ref.barrier_combine_(outs, f, q, coef),
        })
        table.add("barrier_combine_", shape, "twin (per-tensor loop)", t["twin"], t["nrcore"], bytes_moved=nbytes(outs, f, q))
    return table


# ---------------------------------------------------------------------------------------------
# tangent products
# ---------------------------------------------------------------------------------------------


class Head(nn.Module):
    """ResNet-32's last stage + classifier, fed with the output of the (frozen) first two."""

    def __init__(self, model):
        super().__init__()
        self.layer3, self.classifier = model.layer3, model.classifier

    def forward(self, h):
        return self.classifier(F.adaptive_avg_pool2d(self.layer3(h), 1).flatten(1))


def tangent_setup(device: torch.device, batch: int = 128):
    """Model head, stage-2 features of three batches (two timed, one for warm-up), the sign
    vector r, C + 1 directions and the contenders."""
    from torch.func import functional_call, grad, vmap

    from nrcore import ops
    from nrcore.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet32", (3, 32, 32), 10).to(device).eval()
    head = Head(model)
    with torch.no_grad():
        def stem(x):
            return model.layer2(model.layer1(F.relu(model.bn1(model.conv1(x)))))

        hs = [stem(torch.randn(batch, 3, 32, 32, device=device)) for _ in range(3)]
    r = torch.randn(10, device=device)
    k = 11
    names = [n for n, _ in head.named_parameters()]
    directions = {n: torch.randn(k, *p.shape, device=device) for n, p in head.named_parameters()}
    params = {n: p.detach() for n, p in head.named_parameters()}
    buffers = dict(head.named_buffers())

    def value(p, hi):
        return functional_call(head, (p, buffers), (hi[None],))[0] @ r

    per_example = vmap(grad(value), in_dims=(None, 0))

    def func_dot(h):
        per = per_example(params, h)
        return sum(per[n].flatten(1) @ directions[n].reshape(k, -1).T for n in names)

    def func_kernel(ha, hb):
        pa, pb = per_example(params, ha), per_example(params, hb)
        return sum(pa[n].flatten(1) @ pb[n].flatten(1).T for n in names)

    def record(rec, h):
        h = h.detach().requires_grad_(True)  # ask for input gradients only: no weight .grad
        with rec.record():
            out = head(h) @ r
            torch.autograd.grad(out.sum(), [h])
        return rec

    rec_a, rec_b = ops.PerSampleGradRecorder(head), ops.PerSampleGradRecorder(head)

    def nrcore_dot(h):
        return record(rec_a, h).dot_many(directions)

    def nrcore_dot_streamed(h):
        h = h.detach().requires_grad_(True)
        with rec_a.record(directions=directions):  # contract during the backward, keep nothing
            torch.autograd.grad((head(h) @ r).sum(), [h])
        return rec_a.streamed()

    def nrcore_kernel(ha, hb):
        return record(rec_a, ha).kernel(record(rec_b, hb))

    def nrcore_kernel_streamed(ha, hb):
        record(rec_a, ha)
        hb = hb.detach().requires_grad_(True)
        with rec_b.record(kernel_with=rec_a):  # batch b streams against the stored batch a
            torch.autograd.grad((head(hb) @ r).sum(), [hb])
        return rec_b.streamed().T

    contenders = {
        "func-dot": lambda: func_dot(hs[0]),
        "nrcore-dot": lambda: nrcore_dot(hs[0]),
        "nrcore-dot-streamed": lambda: nrcore_dot_streamed(hs[0]),
        "func-kernel": lambda: func_kernel(hs[0], hs[1]),
        "nrcore-kernel": lambda: nrcore_kernel(hs[0], hs[1]),
        "nrcore-kernel-streamed": lambda: nrcore_kernel_streamed(hs[0], hs[1]),
    }
    warmup = lambda: record(ops.PerSampleGradRecorder(head), hs[2])  # noqa: E731
    return dict(head=head, hs=hs, contenders=contenders, warmup=warmup, record=record, directions=directions,
                nrcore_dot=nrcore_dot, nrcore_dot_streamed=nrcore_dot_streamed, func_dot=func_dot)


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(name: str, device: torch.device) -> None:
    """Run in a fresh process: peak memory of one contender's first call (see the docstring)."""
    setup = tangent_setup(device)
    setup["warmup"]()
    fn = setup["contenders"][name]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current resident size
        before = rss_bytes("VmRSS")
        fn()
        peak = rss_bytes("VmHWM") - before
    print(json.dumps({"peak_bytes": peak}))


def measure_peak(name: str, device: torch.device) -> Optional[float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--probe", name, "--device", str(device),
         "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    if proc.returncode != 0:
        print(f"memory probe {name} failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def bench_tangent(timer: Timer, device: torch.device, goals: List[str]) -> Table:
    from nrcore import ops
    from nrcore.ops import reference as ref

    table = Table("Per-sample Jacobian-kernel products (ResNet-32 last stage + classifier)", memory=True)
    s = tangent_setup(device)
    c = s["contenders"]
    check = (s["func_dot"](s["hs"][0]) - s["nrcore_dot"](s["hs"][0])).abs().max() / s["func_dot"](s["hs"][0]).abs().max()
    assert float(check) < 1e-3, f"nrcore and torch.func disagree: relative error {float(check):.2e}"
    streamed = s["nrcore_dot_streamed"](s["hs"][0])
    assert float((streamed - s["nrcore_dot"](s["hs"][0])).abs().max() / streamed.abs().max()) < 1e-4
    rows = (
        ("tangent_dot", "func-dot", "B=128, k=11", (("nrcore-dot", "record + dot_many"), ("nrcore-dot-streamed", "record(directions=)"))),
        ("tangent_kernel", "func-kernel", "B=128 x M=128", (("nrcore-kernel", "two records"), ("nrcore-kernel-streamed", "record(kernel_with=)"))),
    )
    for op, base, shape, mine in rows:
        names = (base,) + tuple(name for name, _ in mine)
        t = timer.compare({name: c[name] for name in names})
        mem = {name: measure_peak(name, device) for name in names}
        for name, how in mine:
            table.add(op, f"{shape}, {how}", "torch.func vmap(grad)", t[base], t[name], mem[base], mem[name])
            goals.append(goal(f"{op} ({how}) vs torch.func: time", t[base] / t[name], 3.0))
            if mem[base] and mem[name]:
                goals.append(goal(f"{op} ({how}) vs torch.func: peak memory", mem[base] / mem[name], 5.0))

    # The compiled ops against their twins on the recorded layers' own inputs (conv layers: the
    # Conv2d forms, whose twins unfold with torch; the classifier: the generic ops).
    rec_a = s["record"](ops.PerSampleGradRecorder(s["head"]), s["hs"][0])
    rec_b = s["record"](ops.PerSampleGradRecorder(s["head"]), s["hs"][1])
    dots, kernels = [], []
    for (layer, uses_a), (_, uses_b) in zip(rec_a._checked_uses(), rec_b._checked_uses()):
        if "weight" not in layer.params or not isinstance(layer.module, (nn.Conv2d, nn.Linear)):
            continue
        ua, ub = uses_a[0], uses_b[0]
        D = s["directions"][layer.params["weight"][0]]
        if isinstance(layer.module, nn.Conv2d):
            geometry = dict(zip(("kernel_size", "stride", "padding", "dilation"), rec_a._conv_geometry(layer)))
            dots.append((ops.conv_tangent_dot, ref.conv_tangent_dot, (ua.inp, ua.grad, D), geometry))
            kernels.append((ops.conv_tangent_kernel, ref.conv_tangent_kernel, (ua.inp, ua.grad, ub.inp, ub.grad), geometry))
        else:
            acts, grads = rec_a._linear_parts(ua, layer.module)
            dots.append((ops.tangent_dot, ref.tangent_dot, (acts, grads, D), {}))
            kernels.append((ops.tangent_kernel, ref.tangent_kernel, (acts, grads, *rec_b._linear_parts(ub, layer.module)), {}))
    for name, calls, shape in (("tangent_dot (op)", dots, f"{len(dots)} layers, B=128, k=11"),
                               ("tangent_kernel (op)", kernels, f"{len(kernels)} layers, 128 x 128")):
        t = timer.compare({
            "nrcore": lambda calls=calls: [mine(*args, **kw) for mine, _, args, kw in calls],
            "twin": lambda calls=calls: [twin(*args, **kw) for _, twin, args, kw in calls],
        })
        table.add(name, shape, "twin", t["twin"], t["nrcore"])
    return table


def goal(what: str, achieved: float, target: float) -> str:
    return f"{'met   ' if achieved >= target else 'MISSED'}  {what}: {achieved:.1f}x (goal {target:g}x)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="fbr,barrier,tangent", help="comma-separated sections")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds per row (median)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="minimum duration of one timed sample")
    parser.add_argument("--threads", type=int, default=None, help="torch / nrcore CPU threads")
    parser.add_argument("--peak-gbs", type=float, default=None, help="the device's peak memory bandwidth in GB/s (default: known GPUs by name)")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe:
        probe(args.probe, device)
        return
    from nrcore import ops

    import nrcore._C as C

    print(f"# nrcore.ops benchmark: device={device}, backend={ops.backend(device)}, cpu_isa={C.cpu_isa()}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, reps={args.reps}")
    timer = Timer(device, args.reps, args.sample_ms)
    Table.peak_gbs = peak_bandwidth_gbs(device, args.peak_gbs)
    if Table.peak_gbs:
        print(f"# peak memory bandwidth {Table.peak_gbs:.0f} GB/s")
    goals: List[str] = []
    sections = {"fbr": bench_fbr, "barrier": bench_barrier, "tangent": bench_tangent}
    for name in args.only.split(","):
        sections[name.strip()](timer, device, goals).print()
    if goals:
        print("\n## Goals (issue 2)\n")
        for line in goals:
            print("- " + line)


if __name__ == "__main__":
    main()
