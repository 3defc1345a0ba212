"""`nrcore` command line.

    nrcore train --method ebomlc --noise sym80      train one method; see `nrcore train --help`
    nrcore methods                                  the methods, one line each, with their papers
    nrcore presets                                  named paper settings for `--preset`
    nrcore report RUN_DIR... --out DIR              figures of runs (nrcore.report)
    nrcore table RUN_DIR...                         mean ± std tables over seeds (nrcore.report)
    nrcore audit RUN_DIR                            the suspect labels of a finished run (nrcore.audit)

Method-specific flags are generated from each method's declared `Option`s, so the CLI needs no
edits when a method is added.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Dict

import click

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_RANK_LOST = 4  # torchrun: another process of the run died (the last checkpoint is intact)


class _LazyGroup(click.Group):
    """Subcommands that live in other modules are imported only when used (keeps `--help` and
    `train` start-up free of matplotlib and friends)."""

    lazy = {"report": "nrcore.report.cli:report", "table": "nrcore.report.cli:table", "audit": "nrcore.audit.cli:audit"}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise click.ClickException(f"command {name!r} is unavailable: {exc}") from None
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="nrcore")
def cli():
    """nrcore: train classifiers on noisily labelled data, helped by a small trusted subset.

    Every method runs in the same harness and reports honest numbers: the last epoch's test
    accuracy and the test accuracy at the epoch with the best clean-validation accuracy (never
    the best test accuracy)."""


# ---- option plumbing ----------------------------------------------------------------------
def _method_option_decorators(shown_method=None):
    """One click option per distinct method option name (shared names must agree on type). All
    of them parse; `--help` lists only those of `shown_method` (`nrcore train --method M --help`),
    so the plain `--help` stays the common flags."""
    from nrcore.methods import registry

    by_name: Dict[str, Dict[str, Any]] = {}
    for method_name, cls in registry().items():
        for opt in cls.options:
            entry = by_name.setdefault(opt.name, {"opt": opt, "methods": []})
            if entry["opt"].type != opt.type:
                raise TypeError(f"option {opt.name!r} has different types in different methods")
            entry["methods"].append((method_name, opt))
    decorators = []
    for name, entry in sorted(by_name.items()):
        opt = entry["opt"]
        defaults = "; ".join(f"{m}: {o.default}" for m, o in entry["methods"])
        owners = dict(entry["methods"])
        if shown_method in owners:
            help_text = f"[{shown_method}] {owners[shown_method].help} (default {owners[shown_method].default})"
        else:
            help_text = f"[{', '.join(owners)}] {opt.help} (default {defaults})"
        hidden = shown_method not in owners
        flag = opt.flag
        if opt.type is bool:
            decl = f"{flag}/--no-{flag[2:]}"
            decorators.append(click.option(decl, name, default=None, help=help_text, hidden=hidden))
        elif isinstance(opt.type, tuple):
            decorators.append(click.option(flag, name, type=click.Choice(opt.type), default=None, help=help_text, hidden=hidden))
        else:
            decorators.append(click.option(flag, name, type=opt.type, default=None, help=help_text, hidden=hidden))
    return decorators, set(by_name)


def _method_in_argv(argv) -> "str | None":
    """The method an argument list names, by --method M (or --method=M) or by a --preset that
    selects one: whose own flags `nrcore train --help` lists."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        return None
    found = {}
    for i, arg in enumerate(argv):
        for flag in ("--method", "--preset"):
            if arg == flag and i + 1 < len(argv):
                found[flag] = argv[i + 1]
            elif arg.startswith(flag + "="):
                found[flag] = arg.split("=", 1)[1]
    if "--method" in found:
        return found["--method"]
    if "--preset" in found:
        from nrcore.train.presets import all_presets

        return all_presets().get(found["--preset"], {}).get("method")
    return None


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs like 80,100, got {value!r}") from None


_TRAIN_HELP = """Train one method on one dataset with one noise model.

\b
Examples:
  nrcore train --method ebomlc --noise sym80                 # digits, offline, ~1 minute
  nrcore train --method fbr --dataset mnist10k --data-dir ../shared/data --noise sym80
  nrcore train --preset ebomlc-cifar10 --noise unif40 --data-dir DATA
  nrcore train --resume runs/ebomlc-digits-sym80-seed0       # continue after a crash

Settings resolve in layers: built-in < dataset defaults < --preset < --config FILE < flags.
Noise specs: clean, symR, unifR, asymR, pairR, flipR (R in percent, e.g. sym80), and the
CIFAR-N real label sets aggre, random1..3, worst, noisy100.

\b
Each method's own flags (--xi, --step-size, --forget-rate, ...) are listed by
  nrcore train --method M --help        (or: nrcore methods M)

\b
RUN_DIR (--out) receives:
  config.json     resolved settings           metrics.jsonl  one line per epoch
  summary.json    final numbers + config      checkpoint.pt  resume point (atomic)
  labels/         this run's noisy labels     weights.npz    per-example-weight methods
"""


def _train_command(shown_method=None):
    method_decorators, method_option_names = _method_option_decorators(shown_method)

    @click.command("train", help=_TRAIN_HELP, context_settings={"max_content_width": 100})
    @click.option("--method", default=None, help="Training method (see `nrcore methods`). Default: ce.")
    @click.option("--dataset", default=None, help="digits, mnist10k, mnist, fashion-mnist, cifar10, cifar100, cifar10n, cifar10n-cpu (the CPU protocol: 10,000 CIFAR-10N images, resnet8), cifar100n, clothing1m, custom. Default: digits (offline).")
    @click.option("--data-dir", default=None, help="Folder with the dataset files (default $NRCORE_DATA).")
    @click.option("--noise", default=None, help="Noise model, e.g. sym80, unif40, asym40, pair45, flip20, aggre. Default: clean.")
    @click.option("--model", default=None, help="resnet8, resnet32, resnet34, preact-resnet18, cnn, mlp, resnet50. Default: the dataset's.")
    @click.option("--epochs", type=int, default=None, help="Training epochs.")
    @click.option("--batch-size", type=int, default=None, help="Noisy-batch size.")
    @click.option("--clean-batch-size", type=int, default=None, help="Trusted-batch size for methods that use one (default: --batch-size).")
    @click.option("--eval-batch-size", type=int, default=None, help="Batch size for evaluation (default 128 on the CPU, where larger batches run slower, 1000 on CUDA).")
    @click.option("--lr", type=float, default=None, help="Main model's SGD learning rate.")
    @click.option("--momentum", type=float, default=None, help="SGD momentum (default 0.9).")
    @click.option("--weight-decay", type=float, default=None, help="SGD weight decay (default 5e-4).")
    @click.option("--schedule", type=click.Choice(["multistep", "cosine", "constant"]), default=None, help="Learning-rate schedule (default multistep).")
    @click.option("--milestones", callback=_int_list, default=None, help="Epochs where multistep multiplies the lr by --gamma, e.g. 80,100.")
    @click.option("--gamma", type=float, default=None, help="Multistep decay factor (default 0.1).")
    @click.option("--clean-size", type=int, default=None, help="Trusted (clean) set size, class-balanced, rounded to whole per-class counts.")
    @click.option("--clean-frac", type=float, default=None, help="Trusted set size as a fraction of the training set (e.g. 0.02).")
    @click.option("--val-size", type=float, default=None, help="Clean validation split for model selection: a count (>= 1) or a fraction (< 1); 0 for none.")
    @click.option("--train-size", type=int, default=None, help="Train on a class-balanced subset of this many training images (the trusted and validation splits come from the rest; --clean-frac and fractional --val-size are of this size). cifar10n-cpu: 10000.")
    @click.option("--data-seed", type=int, default=None, help="Seed of the --train-size subset (default 0; independent of --seed, so every seed trains on the same images).")
    @click.option("--cv-fold", default=None, help="K/N: hold out fold K of N of the noisy training set (stratified by label) and save the final model's posterior on it in audit.npz: cross-validated predictions, e.g. for cleanlab.")
    @click.option("--use-clean-in-train/--no-use-clean-in-train", default=None, help="Add the trusted examples to the training set (for methods that do not use them).")
    @click.option("--seed", type=int, default=None, help="Seed for noise, splits, initialisation and data order (default 0).")
    @click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    @click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
    @click.option("--channels-last/--no-channels-last", default=None, help="Keep conv weights and activations in channels-last (NHWC) layout: the same computation up to float rounding, faster on the CPU. Default: on for CPU runs except double-backprop steps (mlc, --hypergrad autograd), off on CUDA.")
    @click.option("--sync-bn/--no-sync-bn", default=None, help="Under torchrun: BatchNorm layers normalise with the statistics of the whole global batch (exactly the one-process run), not each process's slice.")
    @click.option("--dist-timeout", type=float, default=None, help="Under torchrun: seconds a collective waits for the other processes before the run stops with an error (default 600).")
    @click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default=None, help="Mixed precision: forwards under autocast, float32 weights (fp16 with loss scaling, for methods whose gradients come from one backward). Default: off on the CPU, bf16 on CUDA where supported.")
    @click.option("--track-examples", type=int, default=None, help="Weight trajectories stored for per-example-weight methods (default 500).")
    @click.option("--track-per-epoch", type=int, default=None, help="Points per epoch of those trajectories (default 4; early phases happen within epoch 1).")
    @click.option("--download/--no-download", default=None, help="Fetch missing datasets through torchvision when it is installed.")
    @click.option("--verify-checksums/--no-verify-checksums", default=None, help="Check official files against their known checksums (default on).")
    @click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Run directory (default runs/METHOD-DATASET-NOISE-seedS).")
    @click.option("--resume", type=click.Path(file_okay=False), default=None, help="Continue the run in this directory from its last checkpoint.")
    @click.option("--stop-after-epoch", type=int, default=None, help="Stop (resumably) once this many epochs are done, e.g. to fit a job time limit.")
    @click.option("--preset", default=None, help="Named paper setting (see `nrcore presets`), e.g. ebomlc-cifar10.")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, help="JSON or TOML file of settings (a run's config.json works).")
    @click.option("--quiet", is_flag=True, default=False, help="Print nothing but errors and the final line.")
    @click.option("--progress", type=click.Choice(["auto", "bar", "lines"]), default="auto", help="Progress display (auto: bar on a terminal, a line per epoch otherwise).")
    def train_cmd(**kwargs):
        _run_train(kwargs, method_option_names)

    for decorate in reversed(method_decorators):
        train_cmd = decorate(train_cmd)
    return train_cmd


def _run_train(kwargs: Dict[str, Any], method_option_names) -> None:
    from nrcore.train import NonFiniteLossError, TrainConfig, resolve_config, train
    from nrcore.train.config import with_new_option_defaults
    from nrcore.train.progress import Progress

    method_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in method_option_names}
    out, resume = kwargs.pop("out"), kwargs.pop("resume")
    stop_after = kwargs.pop("stop_after_epoch")
    preset, config_file = kwargs.pop("preset"), kwargs.pop("config_file")
    quiet, progress_mode = kwargs.pop("quiet"), kwargs.pop("progress")
    given = {k: v for k, v in kwargs.items() if v is not None}
    given_method = {k: v for k, v in method_opts.items() if v is not None}

    if resume:
        import json

        from nrcore.train.trainer import RESUMABLE_CHANGES

        blocked = sorted(set(given) - RESUMABLE_CHANGES) + sorted(given_method)
        if preset or config_file or out:
            blocked += [n for n, v in (("preset", preset), ("config", config_file), ("out", out)) if v]
        if blocked:
            flags = ", ".join("--" + b.replace("_", "-") for b in blocked)
            raise ValueError(f"--resume continues a run with its saved settings; {flags} cannot change (only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE_CHANGES))} can)")
        config_path = Path(resume) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"--resume: {resume!r} has no config.json (not a run directory)")
        cfg = TrainConfig(**{**with_new_option_defaults(json.loads(config_path.read_text())), **given})
        run_dir = Path(resume)
    else:
        cfg = resolve_config(cli=given, cli_method_options=given_method, preset=preset, config_file=config_file)
        run_dir = Path(out) if out else _default_run_dir(cfg)

    progress = Progress("quiet" if quiet else progress_mode)
    try:
        summary = train(cfg, run_dir, resume=bool(resume), progress=progress, stop_after_epoch=stop_after)
    except NonFiniteLossError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_DIVERGED)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return
    line = f"{summary['status']}: {cfg.method} on {cfg.dataset}/{cfg.noise}: test acc last {_pct(summary['test_acc_last'])}"
    if summary["test_acc_best_val"] is not None:
        line += f", at best val (epoch {summary['best_val_epoch']}) {_pct(summary['test_acc_best_val'])}"
    click.echo(f"{line}; {run_dir / 'summary.json'}")


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _default_run_dir(cfg) -> Path:
    base = Path("runs") / f"{cfg.method}-{cfg.dataset}-{cfg.noise}-seed{cfg.seed}"
    candidate, k = base, 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate, k = Path(f"{base}-{k}"), k + 1
    return candidate


# ---- listing commands -------------------------------------------------------------------
@cli.command("methods")
@click.argument("names", nargs=-1)
@click.option("-v", "--verbose", is_flag=True, help="Also list each method's options and presets.")
def methods_cmd(names, verbose):
    """List the training methods, one line each, with the paper each comes from; with NAMES,
    those methods with their options (their `nrcore train` flags) and presets."""
    from nrcore.methods import get_method, registry

    reg = registry()
    if names:
        reg = {name: get_method(name) for name in names}  # an unknown name: one-line error listing the methods
        verbose = True
    width = max(len(n) for n in reg)
    for name, cls in reg.items():
        clean = " [trusted set]" if cls.needs_clean else ""
        click.echo(f"{name:<{width}}  {cls.summary}{clean}  ({cls.paper})")
        if verbose:
            for opt in cls.options:
                click.echo(f"{'':<{width}}    {opt.flag} (default {opt.default}): {opt.help}")
            for preset in cls.presets:
                click.echo(f"{'':<{width}}    preset {preset}")


@cli.command("presets")
def presets_cmd():
    """List the named settings usable with `nrcore train --preset NAME`."""
    from nrcore.train.presets import all_presets

    for name, values in all_presets().items():
        settings = ", ".join(f"{k}={v}" for k, v in values.items())
        click.echo(f"{name}: {settings}")


def _is_rank_lost(exc: BaseException) -> bool:
    """An error of nrcore.parallel (imported only now: `--help` does not load torch)."""
    from nrcore.parallel import RankLostError

    return isinstance(exc, RankLostError)


def main(argv=None) -> None:
    """Entry point: every error is one line on stderr and a non-zero exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # parallel.launched_by_torchrun(), without importing torch
        return _main(argv)
    from nrcore import parallel  # a torchrun rank: it ends without the interpreter's teardown

    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code
        if not isinstance(code, int):  # sys.exit("message"): Python would print it and exit 1
            print(code, file=sys.stderr)
            code = 1
    parallel.end_process(code)


def _main(argv=None) -> None:
    cli.add_command(_train_command(_method_in_argv(argv)))
    try:
        rv = cli.main(args=argv, prog_name="nrcore", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (ValueError, FileNotFoundError) as exc:  # user errors (DataError is a ValueError); bugs keep their traceback
        if os.environ.get("NRCORE_DEBUG"):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted; the last finished epoch is checkpointed (resume with --resume RUN_DIR)", err=True)
        sys.exit(130)
    except RuntimeError as exc:
        if not _is_rank_lost(exc):
            raise
        click.echo(f"error: {exc}", err=True)  # torchrun: another process died or the launcher stopped this one
        sys.exit(EXIT_RANK_LOST)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
