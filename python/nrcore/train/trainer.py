"""The training loop every method shares.

The trainer owns epochs, the learning-rate schedule, evaluation, logging and checkpoints; the
method owns its models, optimisers and the per-step update (see nrcore.methods.base). Files in
RUN_DIR:

    config.json            the fully resolved configuration
    metrics.jsonl          one JSON object per finished epoch (rewritten atomically each epoch)
    summary.json           the run's headline numbers and config (written at the end, or when a
                           run stops early, with "status" saying why)
    checkpoint.pt          everything needed to resume after the last finished epoch
    labels/...             the noisy labels and splits of this run (from nrcore.data)
    weights.npz            per-example-weight methods: trajectories of a fixed random subset
                           (clean and noisy marked; `--track-per-epoch` points per epoch at
                           fractional epochs `trajectory_epochs`) and every example's final weight
    audit.npz              per-example signals for `nrcore audit` (nrcore.train.dynamics), at the end
    <method files>         whatever the method saves at the end (see its docstring)

Determinism: each epoch reseeds the global RNG and the data-order generators from
(seed, epoch), so a resumed run repeats exactly what an uninterrupted one does on CPU.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

import nrcore
from nrcore import parallel
from nrcore.methods.base import MethodContext, OptimConfig, derive_seed, get_method
from nrcore.atomic import atomic_write_bytes, atomic_write_json
from nrcore.train.checkpoint import load_checkpoint, save_checkpoint
from nrcore.train.config import TrainConfig, amp_dtype_for, changed_settings, channels_last_for, eval_batch_size_for, lr_factor, parse_cv_fold
from nrcore.train.dynamics import TrainingDynamics, default_signal, prediction_signal, write_audit_file
from nrcore.models.inference import evaluate
from nrcore.train.metrics import weight_stats
from nrcore.train.progress import Progress

# Config keys that may differ when resuming (they do not change what is computed).
RESUMABLE_CHANGES = {"epochs", "device", "threads", "channels_last", "eval_batch_size", "data_dir", "download", "verify_checksums", "dist_timeout"}
NONFINITE_CHECK_EVERY = 50  # steps between host reads of the running loss (one sync each)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint is left untouched."""


def build_run_task(cfg: TrainConfig):
    """The task (data, splits, noisy labels) a run with `cfg` trains on: the same for a fresh
    run, a resumed one and the analysis of a finished one (its config from summary.json or
    checkpoint.pt)."""
    from nrcore.data import build_task

    return build_task(
        cfg.dataset,
        data_dir=cfg.data_dir,
        noise=cfg.noise,
        clean_size=cfg.clean_size,
        clean_frac=cfg.clean_frac,
        val_size=cfg.val_size,
        seed=cfg.seed,
        use_clean_in_train=cfg.use_clean_in_train,
        train_size=cfg.train_size,
        data_seed=cfg.data_seed,
        cv_fold=parse_cv_fold(cfg.cv_fold) if cfg.cv_fold else None,
        download=cfg.download,
        verify_checksums=cfg.verify_checksums,
    )


def load_final_model(run_dir: str | Path):
    """(config, task, network) of a saved run, for analysing it: the checkpoint's config, the
    task rebuilt from it (`build_run_task`) and the one network its method keeps as "model"
    (fbr, meta, forward, glc, ...), on the CPU."""
    from nrcore.models import build_model

    state = load_checkpoint(Path(run_dir))
    if "model" not in state["method"]:
        raise ValueError(f"{run_dir}: the checkpoint of method {state['config'].get('method')!r} holds no single 'model'")
    cfg = TrainConfig(**state["config"])
    task = build_run_task(cfg)
    model = build_model(cfg.model, task.input_shape, task.num_classes)
    model.load_state_dict(state["method"]["model"])
    return cfg, task, model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine")
    return device


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: Optional[Progress] = None,
        stop_after_epoch: Optional[int] = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress or Progress("quiet")
        self.stop_after_epoch = stop_after_epoch

    # ------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # under torchrun: join the other ranks (each gets its own GPU); one process otherwise
        self.ranks, self.device = parallel.start(resolve_device(cfg.device), cfg.dist_timeout)
        finished = False
        try:
            summary = self._run()
            finished = True
            return summary
        finally:
            parallel.stop(self.ranks, finished=finished)

    def _run(self) -> Dict[str, Any]:
        cfg, ranks = self.cfg, self.ranks
        if not ranks.is_main:
            self.progress = Progress("quiet")  # one rank prints
        if self.stop_after_epoch is not None and (isinstance(self.stop_after_epoch, bool) or self.stop_after_epoch < 1):
            raise ValueError(f"--stop-after-epoch must be >= 1 (the epochs done when the run stops), got {self.stop_after_epoch}")
        self._check_run_dir()

        from nrcore.data import save_task_labels
        from nrcore.models import build_model

        # Everything that can fail on bad input (data files, noise, split sizes, the method's own
        # option checks) runs before the run directory is made, so a refused run leaves nothing
        # that `nrcore table` would call interrupted.
        cls = get_method(cfg.method)
        if cfg.download and ranks.distributed and not ranks.is_main:
            ranks.barrier()  # rank 0 downloads first, alone
        task = build_run_task(cfg)
        if cfg.download and ranks.distributed and ranks.is_main:
            ranks.barrier()
        if cls.needs_clean and (task.clean is None or len(task.clean) == 0):
            raise ValueError(f"method {cfg.method!r} needs a trusted set: pass --clean-size N or --clean-frac F")
        _check_slices(len(task.train), cfg.batch_size, ranks)
        amp_dtype = amp_dtype_for(cfg, self.device)
        if amp_dtype == torch.float16 and not cls.supports_loss_scaling:
            raise ValueError(
                f"--amp fp16: {cfg.method} computes gradients through look-aheads or autograd.grad, which loss scaling "
                "does not cover (small float16 gradients would underflow); use --amp bf16"
            )
        self.task = task

        torch.manual_seed(derive_seed(cfg.seed, "init"))
        ctx = MethodContext(
            task=task,
            device=self.device,
            model_factory=lambda: build_model(cfg.model, task.input_shape, task.num_classes),
            optim=OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov),
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            channels_last=channels_last_for(cfg, self.device),
            amp_dtype=amp_dtype,
            ranks=ranks,
            sync_bn=cfg.sync_bn,
        )
        self.ctx = ctx
        self.method = cls(ctx, **cfg.method_options)
        self.total_epochs = self.method.num_epochs(cfg.epochs)
        if not self.resume and ranks.is_main:
            self._create_run_dir()
            save_task_labels(task, self.run_dir)

        self.history: List[Dict[str, Any]] = []
        self.trajectory: List[torch.Tensor] = []
        self.trajectory_epochs: List[float] = []
        self.dynamics = TrainingDynamics(len(task.train), task.num_classes, self.device)
        start_epoch = 0
        if self.resume:
            start_epoch = self._restore()
        else:
            self.dynamics.observe_weights(self.method.example_weights())  # the weights before the first step
        self._init_weight_tracking()

        self.progress.message(self._banner(start_epoch))
        status = "finished"
        try:
            for epoch in range(start_epoch, self.total_epochs):
                with ctx.autocast():  # --amp: every forward of the epoch, evaluation included
                    self._run_epoch(epoch)
                if self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch and epoch + 1 < self.total_epochs:
                    status = f"stopped after epoch {epoch + 1} (--stop-after-epoch); continue with --resume {self.run_dir}"
                    break
            if status == "finished" and ranks.is_main:  # every rank holds the same final state
                self.method.save_artifacts(self.run_dir)
                with ctx.autocast():
                    self._write_audit()
        except NonFiniteLossError as exc:
            self._write_summary(status=f"diverged: {exc}")
            raise
        except Exception as exc:  # the reason stays with the run; the last checkpoint is intact
            self._write_summary(status=f"failed: {type(exc).__name__}: {exc}")
            raise
        return self._write_summary(status=status)

    # ------------------------------------------------------------------------------------
    def _check_run_dir(self) -> None:
        """Refuse a missing --resume directory or an --out that holds a run; creates nothing."""
        run_dir = self.run_dir
        if self.resume:
            if not run_dir.is_dir():
                raise ValueError(f"--resume: no run directory {str(run_dir)!r}")
        elif run_dir.exists() and any((run_dir / f).exists() for f in ("checkpoint.pt", "metrics.jsonl", "summary.json")):
            raise ValueError(f"--out {str(run_dir)!r} already holds a run; continue it with --resume {run_dir} or choose another --out")

    def _create_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / "config.json", self.cfg.to_dict())

    def _banner(self, start_epoch: int) -> str:
        t, cfg = self.task, self.cfg
        sizes = f"train {len(t.train)}, trusted {len(t.clean) if t.clean is not None else 0}, val {len(t.val) if t.val is not None else 0}, test {len(t.test)}"
        what = "resuming at" if start_epoch else "starting"
        return (
            f"nrcore {cfg.method} on {cfg.dataset} ({sizes}), noise {cfg.noise} "
            f"(realised {_percent(t.noise_rate_realized)}), model {cfg.model}, {self.device}; "
            f"{what} epoch {start_epoch + 1}/{self.total_epochs}; run dir {self.run_dir}"
        )

    def _restore(self) -> int:
        state = load_checkpoint(self.run_dir)
        changed = changed_settings(state["config"], self.cfg, RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"--resume: the run was made with different settings for {', '.join(changed)}")
        self.method.load_state_dict(state["method"])
        trainer = state["trainer"]
        self.history = list(trainer["history"])
        self.trajectory = list(trainer["trajectory"])
        self.trajectory_epochs = list(trainer["trajectory_epochs"])
        self.dynamics.load_state_dict(trainer.get("dynamics"), int(state["epoch"]))
        if self.ctx.grad_scaler is not None and trainer.get("grad_scaler"):
            self.ctx.grad_scaler.load_state_dict(trainer["grad_scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        return int(state["epoch"])

    def _init_weight_tracking(self) -> None:
        self.tracked_index = None
        weights = self.method.example_weights()
        if weights is None or self.cfg.track_examples == 0:
            return
        n = weights.numel()
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "tracked-examples"))
        k = min(self.cfg.track_examples, n)
        self.tracked_index = torch.randperm(n, generator=g)[:k].sort().values
        self.tracked_index = self.tracked_index.to(weights.device)
        if not self.trajectory:  # weights before the first step
            self.trajectory.append(weights.detach()[self.tracked_index].float().cpu())
            self.trajectory_epochs.append(0.0)

    # ------------------------------------------------------------------------------------
    def _clean_batches(self, epoch: int) -> Optional[Iterator]:
        if not self.method.needs_clean:
            return None
        task, cfg = self.task, self.cfg
        batch_size = min(cfg.clean_batch_size or cfg.batch_size, len(task.clean))
        generator = self.ctx.generator(epoch, "clean")

        def cycle():
            while True:
                yield from task.loader("clean", batch_size, shuffle=True, augment=True, generator=generator, device=self.device)

        return cycle()

    def _run_epoch(self, epoch: int) -> None:
        cfg, method, task = self.cfg, self.method, self.task
        torch.manual_seed(derive_seed(cfg.seed, epoch, "epoch"))
        factor = lr_factor(cfg, method.schedule_epoch(epoch))
        for opt in method.scheduled_optimizers():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor
        method.start_epoch(epoch)

        ranks = self.ranks
        loader = task.loader(
            "train", cfg.batch_size, shuffle=True, augment=True, generator=self.ctx.generator(epoch, "train"), device=self.device,
            ranks=ranks,
        )
        clean_batches = self._clean_batches(epoch)
        self.progress.start_epoch(epoch, self.total_epochs, len(loader))

        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        stat_sums: Dict[str, torch.Tensor] = {}
        steps = examples = 0
        n_steps = len(loader)
        snapshots: List[tuple] = []  # (fractional epoch, tracked weights on device): no sync in the loop
        track = self.tracked_index is not None and self.cfg.track_per_epoch > 0
        t0 = time.perf_counter()
        for batch in loader:
            clean = next(clean_batches) if clean_batches is not None else None
            ranks.begin_step(batch)
            out = method.train_step(batch, clean)
            self.dynamics.observe_step(batch.index, batch.y, out.logits)
            if ranks.distributed:  # every rank gets the rows the others wrote in this step
                ranks.gather_rows_(list(method.example_state().values()) + self.dynamics.example_rows(), batch.index)
            # the step's numbers are means over this rank's slice: weighted by its share, their
            # sum over the ranks is the whole batch's (share 1 for one process)
            loss_sum += out.loss.detach().double() * ranks.share
            for key, value in out.stats.items():
                value = value.detach().double() * ranks.share
                stat_sums[key] = stat_sums[key] + value if key in stat_sums else value
            steps += 1
            examples += batch.total
            if track and (steps * cfg.track_per_epoch) // n_steps > ((steps - 1) * cfg.track_per_epoch) // n_steps:
                snapshots.append((epoch + steps / n_steps, method.example_weights().detach()[self.tracked_index].float().clone()))
            if steps % NONFINITE_CHECK_EVERY == 0 or (not ranks.distributed and self.progress.due()):
                running = ranks.sum(loss_sum).item()  # the one host sync, every few steps (every rank, or none)
                self._check_finite(running, epoch, steps)
                self.progress.update(steps, examples, running / steps)
        if ranks.distributed:
            ranks.sum_([loss_sum] + [stat_sums[k] for k in sorted(stat_sums)])
            if not cfg.sync_bn:  # each rank's BatchNorm saw its slices: evaluate (and go on) with the mean statistics
                ranks.average_([b for m in method.tracked_modules() for b in m.buffers() if b.is_floating_point()])
        mean_loss = loss_sum.item() / max(steps, 1)  # also waits for queued device work
        train_seconds = time.perf_counter() - t0
        self._check_finite(mean_loss, epoch, steps)
        if self.device.type == "cuda":
            _raise_cuda_op_errors(self.device)  # CUDA kernels record bad data instead of syncing

        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": cfg.lr * factor,
            "train_loss": mean_loss,
            "noise_rate_realized": _finite_or_none(task.noise_rate_realized),
            "seconds": train_seconds,
            "steps": steps,
            "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
        }
        record.update({k: v.item() / max(steps, 1) for k, v in stat_sums.items()})
        record.update(method.end_epoch(epoch))

        t_eval = time.perf_counter()
        model = method.eval_model()
        eval_batch = eval_batch_size_for(cfg, self.device)
        test = evaluate(model, task.loader("test", eval_batch, device=self.device, ranks=ranks), ranks)  # each rank a slice
        record.update(test_acc=test["acc"], test_loss=test["loss"])
        if task.val is not None and len(task.val):
            val = evaluate(model, task.loader("val", eval_batch, device=self.device, ranks=ranks), ranks)
            record.update(val_acc=val["acc"], val_loss=val["loss"])
        weights = method.example_weights()
        self.dynamics.observe_weights(weights)
        if weights is not None:
            known = task.train.true_labels >= 0  # rows without a known true label (e.g. Clothing1M) cannot be scored
            record.update(weight_stats(weights[known.to(weights.device)], task.train.is_noisy[known]))
            for when, tracked in snapshots:
                self.trajectory_epochs.append(when)
                self.trajectory.append(tracked.cpu())
        if not method.counts_for_selection(epoch):
            record["selectable"] = False
        record["eval_seconds"] = time.perf_counter() - t_eval
        self.history.append(record)

        if ranks.distributed:
            ranks.check_same(_state_tensors(method.state_dict()), "model and method state after the epoch")
        if ranks.is_main:
            self._save(epoch + 1, weights)
        self.progress.end_epoch(self._epoch_line(record))

    def _check_finite(self, value: float, epoch: int, step: int) -> None:
        if not np.isfinite(value):
            last = f"{self.run_dir / 'checkpoint.pt'} (after epoch {epoch})" if epoch else "none (first epoch)"
            raise NonFiniteLossError(
                f"non-finite training loss ({value}) in epoch {epoch + 1} by step {step}; "
                f"last good checkpoint: {last}. Try a lower --lr."
            )

    def _epoch_line(self, r: Dict[str, Any]) -> str:
        parts = [f"epoch {r['epoch']}/{self.total_epochs}", f"loss {r['train_loss']:.4f}", f"test {r['test_acc']:.2f}%"]
        if "val_acc" in r:
            parts.append(f"val {r['val_acc']:.2f}%")
        if r.get("weight_auroc") is not None:
            parts.append(f"w-auroc {r['weight_auroc']:.3f}")
        parts.append(f"{r['seconds']:.1f}s")
        return "  ".join(parts)

    # ------------------------------------------------------------------------------------
    def _save(self, epochs_done: int, weights: Optional[torch.Tensor]) -> None:
        """Checkpoint, then files derived from it (metrics, weights): all atomic."""
        state = {
            "epoch": epochs_done,
            "config": self.cfg.to_dict(),
            "method": self.method.state_dict(),
            "trainer": {
                "history": self.history, "trajectory": self.trajectory, "trajectory_epochs": self.trajectory_epochs,
                "dynamics": self.dynamics.state_dict(),
                "grad_scaler": None if self.ctx.grad_scaler is None else self.ctx.grad_scaler.state_dict(),
            },
            "rng": {"torch": torch.get_rng_state()},
        }
        save_checkpoint(self.run_dir, state)
        lines = "".join(_json_line(r) for r in self.history).encode()
        atomic_write_bytes(self.run_dir / "metrics.jsonl", lambda f: f.write(lines))
        if weights is not None:
            self._write_weights(weights)

    def _write_audit(self) -> None:
        """audit.npz: the trainer's signals, the final model's posterior on the training split
        (one inference pass) and the method's own (nrcore.train.dynamics)."""
        from nrcore.models.inference import predict_split

        method, task = self.method, self.task
        weights = method.example_weights()
        signals = self.dynamics.signals(weights)
        probs, labels = predict_split(method.eval_model(), task, "train", eval_batch_size_for(self.cfg, self.device), self.device)
        signals["final_prediction"] = prediction_signal(probs, labels)
        own = method.audit_signals()
        clash = sorted(set(own) & set(signals))
        if clash:
            raise ValueError(f"method {self.cfg.method!r} names audit signals {clash} that the trainer already saves")
        signals.update(own)
        extra = {}
        if task.holdout is not None:  # cross-validation: the held-out fold's posterior (what cleanlab reads)
            held_probs, _ = predict_split(method.eval_model(), task, "holdout", eval_batch_size_for(self.cfg, self.device), self.device)
            extra = {"holdout__probs": held_probs.double().cpu().numpy(), "holdout__source_index": task.holdout.source_index.numpy()}
        absent = {}
        if "aum" not in signals:
            absent["aum"] = f"{self.cfg.method}'s training step returns no logits (StepOutput.logits)"
        if weights is None:
            absent["weight_area"] = absent["weight"] = f"{self.cfg.method} keeps no per-example weights"
        write_audit_file(
            self.run_dir, signals, default=default_signal(type(method).audit_default, signals), method=self.cfg.method,
            first_epoch=self.dynamics.first_epoch, absent=absent, extra=extra,
        )

    def _write_weights(self, weights: torch.Tensor) -> None:
        is_noisy = self.task.train.is_noisy.cpu().numpy()
        arrays = {"final_weights": weights.detach().float().cpu().numpy(), "is_noisy": is_noisy}
        if self.tracked_index is not None:
            idx = self.tracked_index.cpu().numpy()
            arrays.update(
                tracked_index=idx,
                tracked_is_noisy=is_noisy[idx],
                trajectories=torch.stack(self.trajectory).numpy(),  # [T, k]; row 0: before training
                trajectory_epochs=np.asarray(self.trajectory_epochs),  # [T] fractional epochs, 0 = before training
            )
        atomic_write_bytes(self.run_dir / "weights.npz", lambda f: np.savez(f, **arrays))

    def _write_summary(self, status: str) -> Dict[str, Any]:
        cfg, h, task = self.cfg, self.history, self.task
        last = h[-1] if h else {}
        results = [r for r in h if r.get("selectable", True)]  # phased methods: only their own epochs
        best = None
        for r in results:
            if r.get("val_acc") is not None and (best is None or r["val_acc"] > best["val_acc"]):
                best = r
        train_seconds = sum(r["seconds"] for r in h)
        steps = sum(r["steps"] for r in h)
        summary = {
            "status": status,
            "method": cfg.method,
            "dataset": cfg.dataset,
            "noise": cfg.noise,
            "noise_rate_nominal": task.noise_rate_nominal,
            "noise_rate_realized": _finite_or_none(task.noise_rate_realized),
            "model": cfg.model,
            "seed": cfg.seed,
            "epochs": len(h),
            "epochs_planned": self.total_epochs,
            "test_acc_last": last.get("test_acc"),
            "val_acc_last": last.get("val_acc"),
            "test_acc_best_val": best["test_acc"] if best else None,
            "best_val_epoch": best["epoch"] if best else None,
            "val_acc_best": best["val_acc"] if best else None,
            "test_acc_max": max((r["test_acc"] for r in results), default=None),
            "test_acc_max_note": "maximum test accuracy over epochs, for comparison with papers that report it; selecting on test data is not a valid result",
            "weight_auroc_last": last.get("weight_auroc"),
            "seconds_per_epoch": train_seconds / len(h) if h else None,
            "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
            "seconds_per_step": train_seconds / steps if steps else None,
            "train_seconds": train_seconds,
            "eval_seconds": sum(r["eval_seconds"] for r in h),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "channels_last": self.ctx.channels_last,  # the layout used (config: null = auto)
            "amp": str(self.ctx.amp_dtype).replace("torch.", "") if self.ctx.amp_dtype is not None else "off",
            "processes": self.ranks.world_size,  # torchrun's ranks (1: one process)
            "ops_backend": _ops_backend(),
            "versions": {"nrcore": nrcore.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "task": task.info,
            "config": cfg.to_dict(),
        }
        if self.ranks.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def _state_tensors(state, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The floating tensors of a (nested) state dict, by dotted path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state} if state.is_floating_point() else {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out: Dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_state_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _check_slices(n_train: int, batch_size: int, ranks) -> None:
    """Under torchrun every rank needs an example of every global batch (an empty slice has no
    mean loss to take a part of)."""
    if not ranks.distributed:
        return
    last = n_train % batch_size or batch_size
    if min(batch_size, last) < ranks.world_size:
        raise ValueError(
            f"--batch-size {batch_size} with {n_train} training examples leaves a batch of {min(batch_size, last)} for "
            f"{ranks.world_size} processes: choose a batch size whose last batch (n_train mod batch size) has at least one example per process"
        )


def _percent(rate) -> str:
    rate = _finite_or_none(rate)
    return "unknown" if rate is None else f"{100 * rate:.1f}%"


def _finite_or_none(value) -> Optional[float]:
    """JSON has no NaN: unknown numbers (e.g. a noise rate without true labels) become null."""
    return float(value) if value is not None and np.isfinite(value) else None


def _json_line(record: Dict[str, Any]) -> str:
    import json

    return json.dumps(record) + "\n"


def _raise_cuda_op_errors(device: torch.device) -> None:
    try:
        from nrcore.ops import check_errors
    except ImportError:  # the package's ops layer failed to import: nothing recorded either
        return
    check_errors(device)


def _ops_backend() -> Optional[str]:
    try:
        from nrcore import ops

        return ops.backend()
    except Exception:  # ops not built yet / import failure should not kill the summary
        return None


def train(cfg: TrainConfig, run_dir: str | Path, **kwargs) -> Dict[str, Any]:
    """Run (or with resume=True continue) one training run; returns the summary dict."""
    return Trainer(cfg, run_dir, **kwargs).run()
