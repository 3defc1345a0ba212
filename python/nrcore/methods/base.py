"""The contract between the trainer and a method.

The trainer owns epochs, the learning-rate schedule, evaluation, logging and checkpoints. A
method owns its models, optimisers and what happens in one training step. Neither knows the
other's internals, and methods know nothing of the CLI: they declare their options as `Option`s
and the CLI turns those into flags.

Writing a method::

    @register
    class MyMethod(Method):
        name = "mine"
        summary = "one line for `nrcore methods`"
        paper = "Author et al., Venue Year"
        needs_clean = True                     # trainer passes a trusted batch to train_step
        options = (Option("tau", float, 0.5, "what tau does"),)

        def __init__(self, ctx, tau):
            super().__init__(ctx)
            self.model = self.track("model", ctx.build_model())
            self.opt = self.track("opt", ctx.make_optimizer(self.model.parameters()))
            self.tau = tau

        def scheduled_optimizers(self):
            return [self.opt]

        def train_step(self, batch, clean):
            ...
            self.backward_and_step(loss, self.opt)   # mixed precision, gradients across processes
            return StepOutput(loss=loss.detach(), logits=logits.detach())

        def eval_model(self):
            return self.model

A method with one network and the run's optimiser subclasses `SingleModelMethod`, which makes
`model` and `opt` (tracked as "model" and "optimizer") and says what is scheduled and evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from nrcore.data.types import Batch, Task
from nrcore.parallel import Ranks


@dataclass(frozen=True)
class Option:
    """A method hyperparameter. The CLI exposes it as `--<name with - for _>`.

    type: int, float, str, bool, or a tuple of allowed strings (a choice).
    Methods that share an option name must agree on its type; each keeps its own default.
    """

    name: str
    type: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def check_number(name: str, value: Any, *, minimum: Optional[float] = None, exclusive: bool = False) -> None:
    """Raise a ValueError naming the option's flag unless `value` is a finite number at least
    `minimum` (above it with `exclusive`). For a method's own range checks in its constructor;
    NaN fails every comparison, so it never slips through."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{flag} must be {'>' if exclusive else '>='} {minimum:g}, got {value!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over `mask` (0 when the mask is empty): one average, not two."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def backward_and_step(loss: torch.Tensor, optimizers, scaler: Optional["torch.amp.GradScaler"] = None, ranks: Optional[Ranks] = None,
                      *, local_mean: bool = True) -> None:
    """`loss.backward()` then each optimiser's step. With a GradScaler (--amp fp16) the loss is
    scaled, the gradients unscaled and checked, and a step with inf/NaN gradients skipped. Under
    torchrun (`ranks`) `loss` is this rank's part of the global batch's loss: a mean over its
    slice (`local_mean`, scaled by its share) or a part of a global sum; the gradients are summed
    over the ranks before the step (nrcore.parallel)."""
    if ranks is not None and ranks.distributed and local_mean:
        loss = ranks.scale_local(loss)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if ranks is not None:
        ranks.sum_grads_(p for opt in optimizers for group in opt.param_groups for p in group["params"])
    if scaler is None:
        for opt in optimizers:
            opt.step()
        return
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()


@dataclass
class OptimConfig:
    """The main model's optimiser, resolved from the CLI/preset (SGD with momentum)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class StepOutput:
    """What `train_step` returns. Keep everything on the device: the trainer sums `loss` and
    `stats` without a host sync and reads them only every few steps.

    loss:   0-d tensor, the training loss of this step (detached)
    stats:  extra 0-d tensors averaged over the epoch into metrics.jsonl (e.g. "beta", "skipped")
    logits: [B, C], the logits of the step's training forward on `batch.x` (detached; the
            evaluated model's, before its update), when the step has them: the trainer turns
            them into each example's training dynamics (its area under the margin) for
            `nrcore audit`, at no extra forward. None: the run has no such signal.
    """

    loss: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    logits: Optional[torch.Tensor] = None


@dataclass
class ExampleSignal:
    """A per-example signal for `nrcore audit`, over the training split (`Batch.index` order):
    `score` float [n], higher = more likely mislabelled; `suggestion` int64 [n], the label the
    signal would give instead (None when it has no opinion); `description`: one line on what
    it is, for the audit's output."""

    score: torch.Tensor
    suggestion: Optional[torch.Tensor] = None
    description: str = ""


class MethodContext:
    """What the trainer gives a method: the task, the device, a model factory, the optimiser
    settings and deterministic random generators."""

    def __init__(
        self,
        task: Task,
        device: torch.device,
        model_factory: Callable[[], nn.Module],
        optim: OptimConfig,
        epochs: int,
        batch_size: int,
        seed: int,
        channels_last: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        ranks: Optional[Ranks] = None,
        sync_bn: bool = False,
    ):
        self.task = task
        self.device = torch.device(device)
        self._model_factory = model_factory
        self.channels_last = channels_last
        # the processes of the run (nrcore.parallel; one by default) and --sync-bn: BatchNorm
        # layers normalise with the statistics of the whole global batch
        self.ranks = ranks if ranks is not None else Ranks(device=self.device)
        self.sync_bn = sync_bn
        self.optim = optim
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        # Reading a device value on the host is free on the CPU, so a method may branch on one
        # there; elsewhere it would wait for the device. Tests set False to run the accelerator's
        # sync-free path on the CPU (under nrcore.train.sync_guard.no_host_sync).
        self.host_reads_free = self.device.type == "cpu"
        # --amp: forwards run under autocast to this dtype (None: full precision); parameters and
        # optimiser state stay float32. float16 scales the losses (GradScaler) so small
        # gradients do not underflow, which only methods with `supports_loss_scaling` allow.
        self.amp_dtype = amp_dtype
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None

    def autocast(self):
        """The run's autocast context (a no-op without --amp). Its cache of low-precision weight
        copies is off: the trainer holds the context over a whole epoch, and methods update a
        network and run it again inside one step (meta models, weight nets), so a cached copy
        would be a stale one."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                              cache_enabled=False)

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def n_train(self) -> int:
        return len(self.task.train)

    def build_model(self) -> nn.Module:
        """A fresh main model on the device (initialised from the global RNG, which the trainer
        seeds before constructing the method), its 4-d weights in channels-last layout when the
        run asks for it (same values up to float rounding; nrcore.models.resolve_channels_last)."""
        model = self._model_factory().to(self.device)
        if self.sync_bn:
            from nrcore.models.sync_batchnorm import convert_sync_batchnorm

            model = convert_sync_batchnorm(model, self.ranks)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def backward_and_step(self, loss: torch.Tensor, optimizers, *, local_mean: bool = True) -> None:
        """`backward_and_step` with the run's GradScaler and ranks."""
        backward_and_step(loss, optimizers, self.grad_scaler, self.ranks, local_mean=local_mean)

    def make_optimizer(self, params: Iterable[torch.nn.Parameter], **overrides) -> torch.optim.SGD:
        """SGD with the run's lr/momentum/weight decay (overrides win)."""
        cfg = dataclasses.asdict(self.optim)
        cfg.update(overrides)
        return torch.optim.SGD(params, **cfg)

    def generator(self, epoch: int, salt: str = "") -> torch.Generator:
        """A CPU generator that depends only on (seed, epoch, salt): resuming at an epoch
        reproduces exactly what an uninterrupted run drew there."""
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch, salt))
        return g


def derive_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from a base seed and any labels (not Python's salted hash)."""
    import hashlib

    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class Method:
    """Base class of every training method. See the module docstring."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_clean: ClassVar[bool] = False  # train_step receives a trusted batch
    options: ClassVar[Tuple[Option, ...]] = ()
    # Named presets: {"ebomlc-cifar10": {"dataset": "cifar10", "model": "resnet32", "epochs": 120,
    #   "lr": 0.1, "milestones": [80, 100], "xi": 0.5, ...}}. Keys are train-config fields or
    #   this method's option names.
    presets: ClassVar[Dict[str, Dict[str, Any]]] = {}

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self._tracked: Dict[str, Any] = {}

    # ---- state -----------------------------------------------------------------------------
    def track(self, key: str, obj: Any) -> Any:
        """Register a module, optimiser, tensor (e.g. per-example weights) or a plain
        int/float/dict to be saved in checkpoints. Returns `obj` for chaining. A plain value is
        kept as the attribute of the same name (`self.key = self.track("key", 0)`), which is
        what checkpoints save, so `self.key += 1` counts."""
        self._tracked[key] = obj
        return obj

    def tracked_modules(self) -> List[nn.Module]:
        """The networks the method tracks (its models, meta models, weight nets)."""
        return [obj for obj in self._tracked.values() if isinstance(obj, nn.Module)]

    def state_dict(self) -> Dict[str, Any]:
        out = {}
        for key, obj in self._tracked.items():
            if hasattr(obj, "state_dict"):
                out[key] = obj.state_dict()
            elif isinstance(obj, torch.Tensor):
                out[key] = obj
            else:  # a plain value: the attribute now (an int that `+=` rebinds, not the one tracked)
                out[key] = getattr(self, key, obj)
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = set(self._tracked) - set(state)
        if missing:
            raise KeyError(f"checkpoint lacks method state {sorted(missing)}")
        for key, obj in self._tracked.items():
            value = state[key]
            if hasattr(obj, "load_state_dict"):
                obj.load_state_dict(value)
            elif isinstance(obj, torch.Tensor):
                obj.copy_(value)
            else:
                self._tracked[key] = value
                setattr(self, key, value)

    # ---- training --------------------------------------------------------------------------
    def scheduled_optimizers(self) -> List[torch.optim.Optimizer]:
        """Optimisers whose learning rate follows the run's schedule (the trainer multiplies
        each group's `initial_lr` by the schedule factor at the start of every epoch)."""
        return []

    def start_epoch(self, epoch: int) -> None:
        """Called before the first step of `epoch` (0-based)."""

    def train_step(self, batch: Batch, clean: Optional[Batch]) -> StepOutput:
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> Dict[str, float]:
        """Called after the last step of `epoch`; returns extra numbers for metrics.jsonl."""
        return {}

    def eval_model(self) -> nn.Module:
        """The model whose predictions count (test/validation accuracy)."""
        raise NotImplementedError

    def example_weights(self) -> Optional[torch.Tensor]:
        """Per-example weights [n_train] in [0, 1] for methods that keep them (the trainer logs
        their clean/noisy means, AUROC and trajectories); None otherwise."""
        return None

    def example_state(self) -> Dict[str, torch.Tensor]:
        """Every per-example tensor ([n_train, ...], rows in `Batch.index` order) that a training
        step writes at its batch's rows: per-example weights, running targets, selection counts.
        Under torchrun each rank steps on its slice of the global batch and the trainer gathers
        these rows after every step, so all ranks hold the same state; a tensor a step writes
        and that is missing here would drift apart between ranks. Default: `example_weights()`."""
        weights = self.example_weights()
        return {} if weights is None else {"weights": weights}

    def save_artifacts(self, run_dir: Path) -> None:
        """Write method-specific analysis files at the end of a run (e.g. MLC's corrected-label
        confusion matrix). Optional."""

    # The signal `nrcore audit` ranks a run's examples by unless asked for another: one of the
    # names `audit_signals` returns, or a trainer signal ("weight_area", "aum",
    # "final_prediction"); None: the trainer's choice (see nrcore.train.dynamics).
    audit_default: ClassVar[Optional[str]] = None

    def audit_signals(self) -> Dict[str, "ExampleSignal"]:
        """The method's own per-example signals at the end of a finished run (e.g. the meta
        model's corrected labels, how often co-teaching dropped an example), by name; saved in
        RUN_DIR/audit.npz next to the trainer's (training dynamics, final weights and
        predictions). Called once, after the last epoch."""
        return {}

    def schedule_epoch(self, epoch: int) -> int:
        """The epoch the learning-rate schedule sees (methods with phases may remap it)."""
        return epoch

    def counts_for_selection(self, epoch: int) -> bool:
        """Whether the model after `epoch` (0-based) is a result of this method, i.e. a candidate
        for best-validation selection and `test_acc_max`. Phased methods return False for their
        warm-up phase (e.g. GLC's plain noisy-label model)."""
        return True

    def num_epochs(self, epochs: int) -> int:
        """How many trainer epochs a run of `epochs` takes (phased methods may need more)."""
        return epochs

    # Whether --amp fp16 works: the step's gradients come from `backward_and_step` (one loss, a
    # backward, optimiser steps), which the GradScaler can scale. Look-ahead and bilevel methods
    # (autograd.grad through pseudo-updates, hypergradients) are not, and take bf16 instead.
    supports_loss_scaling: ClassVar[bool] = False

    def backward_and_step(self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """`loss.backward()` then each optimiser's step, through the run's GradScaler under --amp
        fp16 and, under torchrun, with gradients summed over the ranks: `loss` is a mean over
        this rank's slice of the batch (the usual `.mean()`)."""
        self.ctx.backward_and_step(loss, optimizers)

    @classmethod
    def suits_channels_last(cls, options: Dict[str, Any]) -> bool:
        """Whether CPU runs with these options default to channels-last layout (an unset
        `--channels-last`; nrcore.models.resolve_channels_last). True unless the step is mostly
        second-order autograd through BatchNorm, whose decomposed reductions run slower in that
        layout (bench/README.md, "Memory layout")."""
        return True


class SingleModelMethod(Method):
    """A method with one network (`model`), trained by the run's SGD (`opt`, on the run's
    schedule) and evaluated as it is: what most methods start from."""

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        self.model = self.track("model", ctx.build_model())
        self.opt = self.track("optimizer", ctx.make_optimizer(self.model.parameters()))

    def scheduled_optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.opt]

    def eval_model(self) -> nn.Module:
        return self.model


# ---- registry ------------------------------------------------------------------------------
_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available to the trainer and the CLI by `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> Dict[str, type]:
    from nrcore import methods  # noqa: F401  (imports every method module)

    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type:
    reg = registry()
    if name not in reg:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(reg)}")
    return reg[name]
