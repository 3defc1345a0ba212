"""Every registered method's time per training step and peak memory, relative to `ce`.

Each method is built through its public interface (a `MethodContext` on a real task, as the
trainer builds it) with the same model, batch size and pre-drawn batches. Timing:

  * the method's `start_epoch` is called for the last epoch of a run (`--epoch`), so phased
    methods (glc, forward with an estimated matrix) are timed in their correcting phase and
    schedules (Co-teaching's forget rate) are fully ramped; its cost is shown as "epoch setup";
  * after `--warmup` steps, `--steps` steps are timed, `--repeats` times, methods interleaved
    (a different order each repeat) so background load on a shared machine hits all alike;
    the table shows the median of the repeats and their min-max;
  * batches are drawn before timing: the numbers are the method's own work, no data loading.

Peak memory: each method in a fresh subprocess (so one method's allocations cannot hide
another's). CPU: peak resident set size above the level after the task is loaded (Linux
`VmHWM`, reset through /proc/self/clear_refs). CUDA: `torch.cuda.max_memory_allocated` above
what was allocated before the method was built (the task's images).

    python bench/methods.py                         # mnist10k if the data is there, else digits
    python bench/methods.py --methods ce,fbr,meta --threads 1 --repeats 7
    python bench/methods.py --methods ce@cl,ce@nchw,mlc@cl,mlc@nchw   # both memory layouts, side by side
    python bench/methods.py --device cuda --model resnet32 --dataset cifar10 --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, also when loaded by path
from variants import parse_variant, split_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE = "ce"


def default_data_dir() -> Optional[str]:
    if os.environ.get("NRCORE_DATA"):
        return os.environ["NRCORE_DATA"]
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


# ---- setting up a method the way the trainer does ------------------------------------------
@dataclass
class Bench:
    """The task, device and batches every method is timed on."""

    args: Any
    task: Any
    device: Any
    batches: List[Any]
    clean_batches: List[Any]

    @classmethod
    def load(cls, args) -> "Bench":
        import torch

        from nrcore.data import build_task
        from nrcore.train.trainer import resolve_device

        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = config_for(args, BASELINE)
        device = resolve_device(cfg.device)
        task = build_task(
            cfg.dataset, data_dir=cfg.data_dir, noise=cfg.noise, clean_size=cfg.clean_size, clean_frac=cfg.clean_frac,
            val_size=cfg.val_size, seed=cfg.seed,
        )
        count = args.warmup + args.steps
        g = torch.Generator().manual_seed(0)
        batches = _take(task.loader("train", cfg.batch_size, shuffle=True, augment=True, generator=g, device=device), count)
        clean_batches = []
        if task.clean is not None and len(task.clean):
            clean_size = min(cfg.batch_size, len(task.clean))
            clean_batches = _take(task.loader("clean", clean_size, shuffle=True, augment=True, generator=g, device=device), count)
        return cls(args, task, device, batches, clean_batches)

    def build(self, name: str):
        """(method object, epochs of a run) for a variant `method[:opt=value,...]`, constructed
        as the trainer constructs it."""
        import torch

        from nrcore.methods import MethodContext, OptimConfig, get_method
        from nrcore.methods.base import derive_seed
        from nrcore.models import build_model
        from nrcore.train.config import amp_dtype_for, channels_last_for

        cfg = config_for(self.args, name)
        cls = get_method(cfg.method)
        amp_dtype = amp_dtype_for(cfg, self.device)
        if amp_dtype == torch.float16 and not cls.supports_loss_scaling:
            raise SystemExit(f"error: --amp fp16: {cfg.method} takes no loss scaling (use --amp bf16)")
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        ctx = MethodContext(
            task=self.task,
            device=self.device,
            model_factory=lambda: build_model(cfg.model, self.task.input_shape, self.task.num_classes),
            optim=OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            channels_last=channels_last_for(cfg, self.device),
            amp_dtype=amp_dtype,
        )
        method = cls(ctx, **cfg.method_options)
        return method, cfg.epochs

    def clean(self, i: int):
        return self.clean_batches[i % len(self.clean_batches)] if self.clean_batches else None

    def step(self, method, i: int) -> None:
        needs_clean = getattr(method, "needs_clean", False)
        with method.ctx.autocast():  # --amp, as the trainer runs steps
            method.train_step(self.batches[i], self.clean(i) if needs_clean else None)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


LAYOUTS = {"cl": True, "nchw": False}  # `variant@cl` / `variant@nchw`: that memory layout


def split_layout(name: str) -> Tuple[str, Optional[bool]]:
    """`variant@cl` -> (variant, True), `variant@nchw` -> (variant, False), else (name, None)."""
    text, at, layout = name.rpartition("@")
    if not at:
        return name, None
    if layout not in LAYOUTS:
        raise SystemExit(f"error: {name!r}: the layout after @ is one of {', '.join(LAYOUTS)}")
    return text, LAYOUTS[layout]


def baseline_of(name: str) -> str:
    """The `ce` a row is divided by: the one in the same layout."""
    _, at, layout = name.rpartition("@")
    return f"{BASELINE}@{layout}" if at else BASELINE


def config_for(args, name: str):
    from nrcore.methods import registry
    from nrcore.train import resolve_config

    text, layout = split_layout(name)
    variant = parse_variant(text, registry())
    given = {"method": variant.method, "dataset": args.dataset, "data_dir": args.data_dir, "noise": args.noise, "device": args.device}
    for key in ("model", "batch_size", "threads", "channels_last", "amp", "clean_frac"):
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    if layout is not None:
        given["channels_last"] = layout
    return resolve_config(cli=given, cli_method_options=dict(variant.options))


def _take(loader, count: int) -> list:
    out: list = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    return out


def start_timed_epoch(bench: Bench, method, epochs: int) -> Tuple[int, float]:
    """Call start_epoch for the epoch we time; returns (that epoch, seconds it took)."""
    total = method.num_epochs(epochs)
    epoch = total - 1 if bench.args.epoch == "last" else min(int(bench.args.epoch), total - 1)
    bench.sync()
    t0 = time.perf_counter()
    method.start_epoch(epoch)
    bench.sync()
    return epoch, time.perf_counter() - t0


# ---- timing -----------------------------------------------------------------------------------
@dataclass
class Timing:
    name: str
    epochs_factor: float = 1.0  # a run of this method takes this many times the epochs of ce
    setup_seconds: float = 0.0
    step_seconds: List[float] = field(default_factory=list)  # one mean per repeat
    error: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.step_seconds) if self.step_seconds else None


def time_methods(bench: Bench, names: Sequence[str]) -> Dict[str, Timing]:
    args = bench.args
    timings = {n: Timing(n) for n in names}
    methods = {}
    for name in names:
        try:
            method, epochs = bench.build(name)
            _, timings[name].setup_seconds = start_timed_epoch(bench, method, epochs)
            timings[name].epochs_factor = method.num_epochs(epochs) / epochs
            for i in range(args.warmup):
                bench.step(method, i)
            bench.sync()
            methods[name] = method
        except Exception as exc:  # report it in the table; the other methods still get timed
            timings[name].error = f"{type(exc).__name__}: {exc}"
    live = list(methods)
    for rep in range(args.repeats):
        shift = rep % max(len(live), 1)
        for name in live[shift:] + live[:shift]:
            method = methods[name]
            bench.sync()
            t0 = time.perf_counter()
            for i in range(args.warmup, args.warmup + args.steps):
                bench.step(method, i)
            bench.sync()
            timings[name].step_seconds.append((time.perf_counter() - t0) / args.steps)
    return timings


# ---- memory (one subprocess per method) --------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def warm_up_runtime(bench: Bench) -> None:
    """One SGD step of a throwaway model on 2 examples, so torch's one-time set-up is not billed
    to the method (kernels, autograd threads; the first optimiser alone imports ~70 MB of
    torch._dynamo)."""
    import torch

    from nrcore.models import build_model
    from nrcore.train.config import channels_last_for

    cfg = config_for(bench.args, BASELINE)
    model = build_model(cfg.model, bench.task.input_shape, bench.task.num_classes).to(bench.device)
    if channels_last_for(cfg, bench.device):
        model = model.to(memory_format=torch.channels_last)  # as the timed methods' models
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    batch = bench.batches[0]
    torch.nn.functional.cross_entropy(model(batch.x[:2]), batch.y[:2]).backward()
    opt.step()
    del model, opt
    bench.sync()


def probe_memory(args) -> Dict[str, Any]:
    """Runs in the child: build one method, run warm-up + timed steps, report its peak."""
    import torch

    bench = Bench.load(args)
    name = args.probe_memory
    cuda = bench.device.type == "cuda"
    warm_up_runtime(bench)
    if cuda:
        bench.sync()
        torch.cuda.reset_peak_memory_stats(bench.device)
        base = torch.cuda.memory_allocated(bench.device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        base = _proc_status_kb("VmRSS") * 1024
    method, epochs = bench.build(name)
    start_timed_epoch(bench, method, epochs)
    for i in range(args.warmup + args.steps):
        bench.step(method, i)
    bench.sync()
    peak = torch.cuda.max_memory_allocated(bench.device) if cuda else _proc_status_kb("VmHWM") * 1024
    return {"method": name, "peak_bytes": peak - base, "kind": "cuda allocated" if cuda else "CPU RSS"}


def measure_memory(args, names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--probe-memory", name] + _forward_args(args)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            out[name] = {"error": tail}
        else:
            out[name] = json.loads(lines[-1])
    return out


def _forward_args(args) -> List[str]:
    out = []
    for key in ("dataset", "data_dir", "noise", "device", "model", "batch_size", "threads", "steps", "warmup", "epoch", "amp", "clean_frac"):
        value = getattr(args, key)
        if value is not None:
            out += ["--" + key.replace("_", "-"), str(value)]
    if args.channels_last is not None:
        out.append("--channels-last" if args.channels_last else "--no-channels-last")
    return out


# ---- the table ---------------------------------------------------------------------------------
def format_table(bench: Bench, timings: Dict[str, Timing], memory: Optional[Dict[str, Dict[str, Any]]]) -> str:
    args = bench.args
    header = ["method", "ms/step", "÷ ce", "min-max ms", "epoch setup ms", "epochs ÷ ce"]
    if memory is not None:
        header += ["peak MB", "÷ ce"]
    rows = []
    errors = []
    for name, t in timings.items():
        base = timings.get(baseline_of(name))
        base_time = base.median if base and not base.error else None
        base_mem = (memory or {}).get(baseline_of(name), {}).get("peak_bytes")
        if t.error:
            rows.append([name, "failed"] + [""] * (len(header) - 2))
            errors.append(f"{name}: {t.error}")
            continue
        row = [
            name,
            f"{1000 * t.median:.2f}",
            f"{t.median / base_time:.2f}×" if base_time else "",
            f"{1000 * min(t.step_seconds):.2f}-{1000 * max(t.step_seconds):.2f}",
            f"{1000 * t.setup_seconds:.1f}",
            f"{t.epochs_factor:g}",
        ]
        if memory is not None:
            m = memory.get(name, {})
            if "peak_bytes" in m:
                row += [f"{m['peak_bytes'] / 2**20:.1f}", f"{m['peak_bytes'] / base_mem:.2f}×" if base_mem else ""]
            else:
                row += ["failed", ""]
                errors.append(f"{name} (memory probe): {m.get('error', '?')}")
        rows.append(row)
    import torch

    from nrcore.report.table import markdown_table

    lines = markdown_table(header, rows)

    cfg = config_for(args, BASELINE)
    clean = len(bench.clean_batches[0]) if bench.clean_batches else 0
    device = str(bench.device) + (f" ({torch.cuda.get_device_name(bench.device)})" if bench.device.type == "cuda" else f", {torch.get_num_threads()} threads")
    from nrcore.train.config import amp_dtype_for

    amp = amp_dtype_for(cfg, bench.device)
    title = (
        f"Methods on {cfg.dataset} (noise {cfg.noise}), model {cfg.model}, batch {cfg.batch_size} noisy"
        f" + {clean} trusted for methods that use them, {device}, amp {str(amp).replace('torch.', '') if amp else 'off'};"
        f" torch {torch.__version__}"
    )
    legend = (
        f"ms/step: median over {args.repeats} repeats of the mean of {args.steps} steps (after {args.warmup} warm-up steps), "
        f"methods interleaved; min-max: the repeats' range. Timed at the {args.epoch} epoch of a run; "
        "epoch setup: that epoch's start_epoch. epochs ÷ ce: how many more epochs a run takes (phased methods train a "
        "first model on the noisy labels). "
        + ("peak MB: peak memory above the loaded task and a warmed-up torch runtime, one fresh process per method "
           f"({next((m['kind'] for m in memory.values() if 'kind' in m), '?')})." if memory is not None else "")
    )
    return "\n".join([title, ""] + lines + ["", legend] + [f"- {e}" for e in errors]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="task to time on (default mnist10k when its data is found, else digits)")
    p.add_argument("--data-dir", default=default_data_dir(), help="data folder (default $NRCORE_DATA, else ../shared/data when present)")
    p.add_argument("--noise", default="sym80", help="noise spec (default sym80; matters for methods whose defaults read the noise rate)")
    p.add_argument("--methods", help="comma-separated methods or variants method:opt=value, each optionally with @cl or @nchw "
                   "for a memory layout (default: every registered method)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--model", help="model (default: the dataset's, cnn for mnist10k/digits)")
    p.add_argument("--batch-size", type=int, help="noisy batch size, also the trusted batch size (default: the dataset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="models in channels-last layout (default: as nrcore train: on for CPU runs of methods that gain from it)")
    p.add_argument("--clean-frac", type=float, help="trusted set as a fraction of the training set (default: the dataset's; needed for custom data)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), help="mixed precision of the steps, as nrcore train --amp (default: off on the CPU, bf16 on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method, interleaved (default 5)")
    p.add_argument("--epoch", default="last", help="epoch whose start_epoch precedes timing: last (default) or a number")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dataset is None:
        mnist = Path(args.data_dir or "") / "mnist"
        args.dataset = "mnist10k" if args.data_dir and mnist.is_dir() else "digits"
    if args.epoch != "last" and not args.epoch.isdigit():
        p.error("--epoch is 'last' or a number")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return 0

    from nrcore.methods import registry

    reg = registry()
    names = split_variants(args.methods) if args.methods else list(reg)
    unknown = [n for n in names if parse_variant(split_layout(n)[0], reg).method not in reg]
    if unknown:
        print(f"warning: not registered, skipped: {', '.join(unknown)}", file=sys.stderr)
        names = [n for n in names if n not in unknown]  # keeps variants (meta:hypergrad=...) of known methods
    baselines = list(dict.fromkeys(baseline_of(n) for n in names)) or [BASELINE]  # the ratios need them, first
    names = baselines + [n for n in names if n not in baselines]

    bench = Bench.load(args)
    print(f"timing {len(names)} methods: {', '.join(names)}", file=sys.stderr, flush=True)
    timings = time_methods(bench, names)
    memory = None
    if not args.no_memory:
        print("measuring peak memory, one process per method", file=sys.stderr, flush=True)
        memory = measure_memory(args, names)
    print(format_table(bench, timings, memory), end="")
    failed = [n for n, t in timings.items() if t.error] + [n for n, m in (memory or {}).items() if "error" in m]
    return 1 if failed else 0  # the table names what failed and why


if __name__ == "__main__":
    sys.exit(main())
