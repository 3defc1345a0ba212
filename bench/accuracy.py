"""Accuracy grid: methods x noise specs x seeds through the real trainer, then the `nrcore table`.

The default grid is the "real measurement" protocol of the trainer and method issues (4, 5, 6, 18):
mnist10k, cnn, 2% class-balanced trusted set, 2% clean validation split, 30 epochs (the
dataset defaults), seeds 0 1 2, noise sym80 and unif40 for every method, and pair40 for the
baselines of issue 6 (with `ce` next to them). Methods not registered in this install are
skipped with a warning, so the script runs while methods are still being written.

    python bench/accuracy.py                              # the protocol (hours on 2 CPU cores)
    python bench/accuracy.py --dataset cifar10n-cpu       # the CPU CIFAR-10N protocol (a day on 2 cores)
    python bench/accuracy.py --dataset cifar10n-cpu --device cuda --threads 1 --jobs 14   # the same, 10 min on one H200 (with MPS)
    python bench/accuracy.py --epochs 1 --seeds 0 --methods ce,fbr --noise sym80   # smoke test
    python bench/accuracy.py --ablation fbr               # FBR components off one at a time, sym80
    python bench/accuracy.py --dry-run                    # what would run, what is done already

Runs go to OUT/<dataset>/<noise>/<method>/seed<S> (default OUT: runs/bench-accuracy, or
runs/bench-accuracy-e<N> with --epochs N so quick checks never mix with full runs). The grid is
resumable: a run whose summary.json says finished is skipped, one with a checkpoint continues
from it (`nrcore train --resume`), a diverged one is reported and not retried (it is
deterministic). Runs go one after another in this process, so their step times are comparable;
`--jobs N` runs N at once in subprocesses, which is faster but distorts the time ratios.

Method variants are written `method:option=value,...`, e.g. `bootstrap:bootstrap_mode=hard` or
`fbr:center=false`; the run directory and the table row name the options that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings, also when loaded by path
from variants import Variant, parse_variant, split_variants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LABEL_CORRECTION = ("mlc", "mlc-d", "ebomlc")  # issue 4 (with ce)
REWEIGHTING = ("meta", "fbr", "fbr-ntk", "l2rw", "mwnet")  # issue 5
BASELINES = (  # issue 6, both variants of bootstrap and forward
    "glc", "coteaching", "coteaching-plus", "bootstrap", "bootstrap:bootstrap_mode=hard",
    "forward", "forward:transition=true",
)
# Issue 18: the FBR paper's strongest competitors. FINE's authors warm up 40 of 120 epochs and
# re-select every 10; scaled to the 30 epochs here: 10 and 3 (docs/methods-baselines.md).
# DivideMix keeps its paper defaults (10 warm-up epochs for 10 classes, noise-dependent lambda_u).
NEW_BASELINES = ("sce", "elr", "jocor", "cores", "fine:fine_warmup=10,fine_every=3", "dividemix")
# (methods, noise specs): the protocol of issues 4-6
# EBOMLC's meta lr 3e-4 was set for ~60k steps (CIFAR, 120 epochs); mnist10k's 30 epochs give
# ~2.4k. 3e-3 was picked on the clean validation split (seed 0, sym80, among 3e-4/3e-3/1e-2) and is
# reported as its own row next to the paper's default.
EBOMLC_FAST = ("ebomlc:meta_lr=0.003",)
DEFAULT_GRID: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...] = (
    (("ce",) + LABEL_CORRECTION + EBOMLC_FAST + REWEIGHTING + BASELINES + NEW_BASELINES, ("sym80", "unif40")),
    (("ce",) + BASELINES + NEW_BASELINES, ("pair40",)),
)
# The CPU CIFAR-10N protocol (`--dataset cifar10n-cpu`): real human noise (`worst` 40%, `aggre`
# 9%), the methods of both papers and the baselines they compare against, and `ce` on the clean
# labels of the same subset as the ceiling. EBOMLC's meta lr: the paper's 3e-4 and the value
# picked on the clean validation split (seed 0, worst, among 3e-4/3e-3/1e-2: last-epoch validation
# 47.5/56.5/58.5%, best 50.5/56.5/61.0%; docs/data.md).
EBOMLC_CPU_CHOSEN = ("ebomlc:meta_lr=0.01",)
CIFAR10N_CPU_GRID: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...] = (
    (("ce", "ebomlc") + EBOMLC_CPU_CHOSEN + ("fbr", "fbr-ntk", "meta", "l2rw", "mwnet:normalize_weights=true", "glc", "coteaching", "forward"),
     ("worst", "aggre")),
    (("ce",), ("clean",)),
)  # fmt: skip
GRIDS = {"cifar10n-cpu": CIFAR10N_CPU_GRID}  # the rest: DEFAULT_GRID (the mnist10k protocol)
DEFAULT_NOISE = {"cifar10n-cpu": ("worst", "aggre")}  # with --methods and no --noise; the rest: sym80, unif40
DEFAULT_SEEDS = (0, 1, 2)

# Issue 5's ablation: each FBR component switched off on its own, at sym80
ABLATIONS: Dict[str, Tuple[Tuple[Tuple[str, ...], Tuple[str, ...]], ...]] = {
    "fbr": ((("ce", "fbr", "fbr:center=false", "fbr:row_shift=false", "fbr:label_sign=false"), ("sym80",)),),
}

# config keys that may differ between the request and a finished run without making it stale
HARMLESS = {"device", "threads", "channels_last", "eval_batch_size", "data_dir", "download"}  # same experiment, other speed


# ---- what to run ---------------------------------------------------------------------------
@dataclass
class GridRun:
    variant: Variant
    noise: str
    seed: int
    run_dir: Path
    cfg: Any = None  # nrcore.train.TrainConfig
    state: str = ""  # done | resume | new | stale | diverged
    detail: str = ""
    finished: bool = False
    outcome: str = ""
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.variant.slug} {self.noise} seed{self.seed}"


def build_grid(args) -> Tuple[List[GridRun], List[str]]:
    """Every run of the grid (seed-major, so a cut-short grid has whole seeds) and warnings."""
    from nrcore.methods import registry
    from nrcore.train import resolve_config

    reg = registry()
    warnings: List[str] = []
    if args.ablation:
        blocks = ABLATIONS[args.ablation]
    elif args.methods or args.noise:
        grid = GRIDS.get(args.dataset, DEFAULT_GRID)
        methods = tuple(split_variants(args.methods)) if args.methods else tuple(dict.fromkeys(m for ms, _ in grid for m in ms))
        noises = tuple(args.noise.split(",")) if args.noise else DEFAULT_NOISE.get(args.dataset, ("sym80", "unif40"))
        blocks = ((methods, noises),)
    else:
        blocks = GRIDS.get(args.dataset, DEFAULT_GRID)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(DEFAULT_SEEDS)

    skipped: Dict[str, None] = {}
    cells: Dict[Tuple[Variant, str], None] = {}
    for methods, noises in blocks:
        for text in methods:
            variant = parse_variant(text, reg)
            if variant.method not in reg:
                skipped[variant.method] = None
                continue
            for noise in noises:
                cells[(variant, noise)] = None
    if skipped:
        warnings.append(f"skipping methods not registered in this install: {', '.join(skipped)} (see `nrcore methods`)")

    runs = []
    for seed in seeds:
        for variant, noise in cells:
            given = {"method": variant.method, "dataset": args.dataset, "noise": noise, "seed": seed, "data_dir": args.data_dir}
            for key in ("epochs", "threads", "device", "model", "channels_last"):
                if getattr(args, key) is not None:
                    given[key] = getattr(args, key)
            cfg = resolve_config(cli=given, cli_method_options=dict(variant.options))
            run_dir = Path(args.out) / args.dataset / noise / variant.slug / f"seed{seed}"
            runs.append(GridRun(variant, noise, seed, run_dir, cfg))
    for run in runs:
        run.state, run.detail = classify(run)
    return runs, warnings


def classify(run: GridRun) -> Tuple[str, str]:
    """What the grid does with this run directory."""
    from nrcore.train.config import changed_settings

    summary_path, config_path = run.run_dir / "summary.json", run.run_dir / "config.json"
    if config_path.is_file():
        differ = changed_settings(json.loads(config_path.read_text()), run.cfg, HARMLESS)
        if differ:
            return "stale", f"holds a run with other {', '.join(differ)}; delete it or choose another --out"
    if summary_path.is_file():
        status = json.loads(summary_path.read_text()).get("status", "")
        if status == "finished":
            return "done", ""
        if status.startswith("diverged"):
            return "diverged", status
    if (run.run_dir / "checkpoint.pt").is_file():
        return "resume", ""
    return "new", ""


# ---- running ---------------------------------------------------------------------------------
def train_in_process(run: GridRun, quiet: bool) -> Tuple[bool, str]:
    """(finished, what happened)."""
    from nrcore.train import NonFiniteLossError, train
    from nrcore.train.progress import Progress

    try:
        summary = train(run.cfg, run.run_dir, resume=run.state == "resume", progress=Progress("quiet" if quiet else "lines"))
    except NonFiniteLossError as exc:
        return False, f"diverged: {exc}"
    return _outcome(summary)


def train_in_subprocess(run: GridRun, quiet: bool) -> Tuple[bool, str]:
    """One `nrcore train` process; its output goes to RUN_DIR/train.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nrcore.cli", "train", "--progress", "lines"]
    config_file = None
    if run.state == "resume":
        cmd += ["--resume", str(run.run_dir)]
        if run.cfg.threads:
            cmd += ["--threads", str(run.cfg.threads)]
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(run.cfg.to_dict(), f)
            config_file = f.name
        cmd += ["--config", config_file, "--out", str(run.run_dir)]
    try:
        with open(run.run_dir / "train.log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        if config_file:
            os.unlink(config_file)
    summary_path = run.run_dir / "summary.json"
    if summary_path.is_file():  # written at the end, or when a run stops early (with the reason)
        return _outcome(json.loads(summary_path.read_text()))
    return False, f"failed (exit {rc}); see {run.run_dir / 'train.log'}"


def _outcome(summary: Dict[str, Any]) -> Tuple[bool, str]:
    if summary.get("status") != "finished":
        return False, str(summary.get("status"))
    text = f"test acc last {summary['test_acc_last']:.2f}%"
    if summary.get("test_acc_best_val") is not None:
        text += f", at best val {summary['test_acc_best_val']:.2f}%"
    if summary.get("weight_auroc_last") is not None:
        text += f", weight AUROC {summary['weight_auroc_last']:.3f}"
    return True, text + f", {1000 * summary['seconds_per_step']:.1f} ms/step"


def run_grid(runs: List[GridRun], jobs: int, quiet: bool) -> List[GridRun]:
    todo = [r for r in runs if r.state in ("new", "resume")]
    total, start = len(todo), time.perf_counter()
    done_count = 0

    def one(run: GridRun) -> GridRun:
        t0 = time.perf_counter()
        try:
            run.finished, run.outcome = train_in_process(run, quiet) if jobs == 1 else train_in_subprocess(run, quiet)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken method must not stop a grid of hours
            run.outcome = f"failed: {type(exc).__name__}: {exc}"
            if os.environ.get("NRCORE_DEBUG"):
                traceback.print_exc()
        run.seconds = time.perf_counter() - t0
        return run

    def report(run: GridRun) -> None:
        nonlocal done_count
        done_count += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done_count * (total - done_count)
        print(f"[{done_count}/{total}] {run.name} ({run.state}): {run.outcome}  [{run.seconds:.0f} s; grid {elapsed / 60:.1f} min, ~{eta / 60:.0f} min left]", flush=True)

    if jobs == 1:
        for run in todo:
            print(f"--- {run.name}: {'resuming' if run.state == 'resume' else 'training'} in {run.run_dir}", flush=True)
            report(one(run))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for run in pool.map(one, todo):
                report(run)
    return todo


# ---- command line -----------------------------------------------------------------------------
def default_data_dir() -> Optional[str]:
    if os.environ.get("NRCORE_DATA"):
        return os.environ["NRCORE_DATA"]
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", default="mnist10k", help="dataset (default mnist10k; its defaults are the protocol)")
    p.add_argument("--data-dir", default=default_data_dir(), help="data folder (default $NRCORE_DATA, else ../shared/data when present)")
    p.add_argument("--methods", help="comma-separated methods or variants (method:opt=value); default: the protocol's")
    p.add_argument("--noise", help="comma-separated noise specs (default with --methods: sym80,unif40)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), help="run an ablation grid instead (fbr: center / row shift / label sign off one at a time, sym80)")
    p.add_argument("--epochs", type=int, help="override the dataset's epochs (quick checks; changes the default --out)")
    p.add_argument("--model", help="override the dataset's model")
    p.add_argument("--threads", type=int, help="torch CPU threads per run (default: torch's choice)")
    p.add_argument("--device", help="auto (default), cpu, cuda ...")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="models in channels-last layout (default: as nrcore train: on for CPU runs of methods that gain from it)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in subprocesses (distorts time ratios; default 1)")
    p.add_argument("--out", help="grid folder (default runs/bench-accuracy[-e<epochs>])")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines from the trainer")
    p.add_argument("--format", choices=("md", "csv"), default="md", help="table format (default md)")
    args = p.parse_args(argv)
    if args.ablation and (args.methods or args.noise):
        p.error("--ablation fixes the methods and noise; drop --methods/--noise")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.out is None:
        suffix = f"-e{args.epochs}" if args.epochs else ""
        suffix += f"-{args.ablation}-ablation" if args.ablation else ""
        args.out = str(Path("runs") / f"bench-accuracy{suffix}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        runs, warnings = build_grid(args)
    except ValueError as exc:  # bad noise spec, unknown dataset, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    counts = {s: sum(r.state == s for r in runs) for s in ("done", "resume", "new", "diverged", "stale")}
    print(f"grid: {len(runs)} runs in {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v), flush=True)
    for run in runs:
        if run.state in ("stale", "diverged") or args.dry_run:
            print(f"  {run.state:8s} {run.name}  {run.run_dir}{'  ' + run.detail if run.detail else ''}")
    if counts["stale"]:
        print("error: some run directories hold runs with other settings (listed above)", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    if args.jobs > 1:
        print(f"warning: --jobs {args.jobs} runs trainings side by side; they compete for cores, so the "
              "time-per-step ratios in the table are distorted. Use --jobs 1 for timings.", file=sys.stderr)

    finished = run_grid(runs, args.jobs, args.quiet)
    failed = [r for r in finished if not r.finished]

    from nrcore.report.table import make_table

    existing = [str(r.run_dir) for r in runs if r.run_dir.is_dir()]
    try:
        text, notes = make_table(existing, args.format) if existing else ("", [])
    except ValueError as exc:  # nothing finished yet
        text, notes = "", [str(exc)]
    print()
    print(text, end="")
    if args.format == "csv" or not text:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    for run in failed:
        print(f"not finished: {run.name}: {run.outcome}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
