"""Run configuration: one flat dataclass, resolved in layers.

Precedence (later wins): built-in defaults < the dataset's defaults < `--preset` < `--config FILE`
< options given on the command line. The resolved config is written to `RUN_DIR/config.json`
and into `summary.json`, so every number can be traced to the settings that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

SCHEDULES = ("multistep", "cosine", "constant")
AMP_MODES = (None, "off", "bf16", "fp16")


@dataclass
class TrainConfig:
    method: str = "ce"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    noise: str = "clean"
    model: str = "cnn"
    epochs: int = 20
    batch_size: int = 100
    clean_batch_size: Optional[int] = None  # None: same as batch_size (capped at the trusted-set size)
    eval_batch_size: Optional[int] = None  # None: 128 on the CPU, 1000 on CUDA (eval_batch_size_for)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"
    milestones: List[int] = field(default_factory=list)  # epochs at which the lr is multiplied by gamma
    gamma: float = 0.1
    clean_size: Optional[int] = None
    clean_frac: Optional[float] = None
    val_size: float = 0.0  # >= 1: a count; in (0, 1): a fraction of the training set; 0: no validation split
    use_clean_in_train: bool = False
    train_size: Optional[int] = None  # train on a class-balanced subset of the training pool (trusted/val from the rest)
    data_seed: int = 0  # fixes that subset; independent of `seed`, so every run seed sees the same images
    cv_fold: Optional[str] = None  # "k/K": train on all but fold k of K of the noisy training set (cross-validated predictions)
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    channels_last: Optional[bool] = None  # None: auto, by device and method (nrcore.models.resolve_channels_last)
    amp: Optional[str] = None  # mixed precision: off, bf16, fp16; None: off on the CPU, bf16 on CUDA where supported
    sync_bn: bool = False  # under torchrun: BatchNorm statistics of the whole global batch (nrcore.models.sync_batchnorm)
    dist_timeout: float = 600.0  # under torchrun: seconds a collective waits for the other ranks before failing
    download: bool = False
    verify_checksums: bool = True
    track_examples: int = 500  # per-example-weight methods: how many weight trajectories to store
    track_per_epoch: int = 4  # ... and how many times per epoch (early phases happen within epoch 1)
    method_options: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

# Per-dataset defaults. The paper datasets follow the EBOMLC/MLC protocol (ResNet-32, SGD 0.1,
# 120 epochs, decay x0.1 at 80 and 100, 2% trusted); method presets override where a paper
# differs. digits and mnist10k are fast settings for this 2-core CPU.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": dict(model="cnn", epochs=20, batch_size=64, lr=0.05, milestones=[15], clean_size=100, val_size=100),
    "mnist10k": dict(model="cnn", epochs=30, batch_size=100, lr=0.05, milestones=[20, 25], clean_frac=0.02, val_size=0.02),
    "mnist": dict(model="cnn", epochs=30, batch_size=128, lr=0.05, milestones=[20, 25], clean_frac=0.02, val_size=0.02),
    "fashion-mnist": dict(model="cnn", epochs=30, batch_size=128, lr=0.05, milestones=[20, 25], clean_frac=0.02, val_size=0.02),
    "cifar10": dict(model="resnet32", epochs=120, batch_size=100, lr=0.1, milestones=[80, 100], clean_frac=0.02, val_size=0.02),
    "cifar100": dict(model="resnet32", epochs=120, batch_size=100, lr=0.1, milestones=[80, 100], clean_frac=0.02, val_size=0.02),
    "cifar10n": dict(model="resnet32", epochs=120, batch_size=100, lr=0.1, milestones=[80, 100], clean_frac=0.02, val_size=0.02),
    # The CPU protocol for natural images and real human noise (docs/data.md, "The CPU protocol"):
    # a 10,000-image class-balanced subset of CIFAR-10 with its CIFAR-10N labels, ResNet-8; the
    # schedule (cosine from 0.1 over 40 epochs) was chosen on the clean validation split.
    "cifar10n-cpu": dict(model="resnet8", epochs=40, batch_size=100, lr=0.1, schedule="cosine", milestones=[], clean_frac=0.02, val_size=0.02,
                         train_size=10000),
    "cifar100n": dict(model="resnet32", epochs=120, batch_size=100, lr=0.1, milestones=[80, 100], clean_frac=0.02, val_size=0.02),
    "clothing1m": dict(model="resnet50", epochs=10, batch_size=64, lr=0.002, milestones=[5], weight_decay=1e-3, clean_size=None),
    "custom": dict(model="cnn", epochs=30, batch_size=100, lr=0.05, milestones=[20, 25]),
}


def load_config_file(path: str | Path) -> Dict[str, Any]:
    """Read a JSON or TOML file of config keys (train fields and method options, flat)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ValueError(f"--config: cannot parse {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {str(path)!r} must hold a table/object of settings")
    if "config" in data and isinstance(data["config"], dict):  # a summary.json or config.json
        data = data["config"]
    return data


def split_overrides(values: Dict[str, Any], option_names: set, source: str) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """Split flat settings into (train-config fields, method options); unknown keys are an error."""
    train, method = {}, {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k == "method_options" and isinstance(value, dict):
            method.update({m.replace("-", "_"): v for m, v in value.items()})
        elif k in FIELDS:
            train[k] = value
        elif k in option_names:
            method[k] = value
        else:
            raise ValueError(f"{source}: unknown setting {key!r}")
    return train, method


def resolve_config(
    *,
    cli: Dict[str, Any],
    cli_method_options: Dict[str, Any],
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
) -> TrainConfig:
    """Merge the layers into one TrainConfig and check the method options against the method.

    `cli` holds only options the user actually gave (None values are dropped)."""
    from nrcore.methods import get_method, registry
    from nrcore.train.presets import all_presets

    methods = registry()
    option_names = {o.name for cls in methods.values() for o in cls.options}

    file_train, file_method = {}, {}
    if config_file:
        file_train, file_method = split_overrides(load_config_file(config_file), option_names, f"--config {config_file}")

    preset_train, preset_method = {}, {}
    if preset:
        presets = all_presets()
        if preset not in presets:
            raise ValueError(f"unknown --preset {preset!r}; known presets: {', '.join(sorted(presets))}")
        preset_train, preset_method = split_overrides(presets[preset], option_names, f"preset {preset}")

    cli = {k: v for k, v in cli.items() if v is not None}
    dataset = cli.get("dataset") or file_train.get("dataset") or preset_train.get("dataset") or TrainConfig.dataset
    if dataset not in DATASET_DEFAULTS:
        from nrcore.data import DATASETS

        raise ValueError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")

    merged: Dict[str, Any] = {}
    layers = ((DATASET_DEFAULTS[dataset], f"the {dataset} defaults"), (preset_train, f"preset {preset}"),
              (file_train, f"--config {config_file}"), (cli, "the command line"))  # fmt: skip
    for layer, source in layers:
        _override_trusted_size(merged, layer, source)
        merged.update(layer)
    method_options = {**preset_method, **file_method, **{k: v for k, v in cli_method_options.items() if v is not None}}

    cfg = TrainConfig(**merged)
    cfg.dataset = dataset
    cls = get_method(cfg.method)
    own = {o.name: o for o in cls.options}
    foreign = sorted(set(method_options) - set(own))
    if foreign:
        flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
        raise ValueError(f"{flags} does not apply to method {cfg.method!r} (its options: {', '.join(o.flag for o in own.values()) or 'none'})")
    cfg.method_options = {name: method_options.get(name, opt.default) for name, opt in own.items()}
    validate(cfg)
    return cfg


TRUSTED_SIZE_FORMS = ("clean_size", "clean_frac")


def _override_trusted_size(merged: Dict[str, Any], layer: Dict[str, Any], source: str) -> None:
    """The trusted-set size has two forms, a count and a fraction: a layer that gives one drops
    whichever the layers below it gave (so --clean-size overrides a preset's clean_frac), and only
    one layer giving both is a conflict."""
    given = [k for k in TRUSTED_SIZE_FORMS if layer.get(k) is not None]
    if len(given) == 2:
        raise ValueError(f"give at most one of --clean-size and --clean-frac ({source} gives both)")
    if given:
        for key in TRUSTED_SIZE_FORMS:
            merged[key] = None


def with_new_option_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A saved run config (config.json, a checkpoint's) with the settings and method options
    added to nrcore since it was written filled in at their defaults. A new setting's default
    keeps the old behaviour, so a run made before it existed still resumes and still matches a
    grid's request."""
    from nrcore.methods import registry

    saved = {**{k: v for k, v in TrainConfig().to_dict().items() if k != "method_options"}, **saved}
    cls = registry().get(saved.get("method"))
    options = saved.get("method_options")
    if cls is None or not isinstance(options, dict):
        return saved
    return {**saved, "method_options": {**{o.name: o.default for o in cls.options}, **options}}


def changed_settings(saved: Dict[str, Any], cfg: TrainConfig, ignore=frozenset()) -> List[str]:
    """The keys, sorted, whose value in `saved` (a run's config.json or checkpoint config) differs
    from `cfg`'s, apart from `ignore`; options added since `saved` was written count at their
    defaults (`with_new_option_defaults`)."""
    saved = with_new_option_defaults(saved)
    return sorted(k for k, v in cfg.to_dict().items() if k not in ignore and saved.get(k) != v)


def validate(cfg: TrainConfig) -> None:
    """Reject settings that would fail later or silently do something else."""

    def positive(name, value, allow_zero=False):
        if value is None:
            return
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for name in ("epochs", "batch_size", "eval_batch_size", "lr", "clean_batch_size", "gamma", "train_size"):
        positive(name, getattr(cfg, name))
    for name in ("momentum", "weight_decay", "val_size", "track_examples", "track_per_epoch"):
        positive(name, getattr(cfg, name), allow_zero=True)
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(m for m in AMP_MODES if m)}, got {cfg.amp!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.clean_size is not None and cfg.clean_frac is not None:
        raise ValueError("give at most one of --clean-size and --clean-frac")
    if cfg.clean_frac is not None and not 0 < cfg.clean_frac < 1:
        raise ValueError(f"--clean-frac must be in (0, 1), got {cfg.clean_frac}")
    if cfg.cv_fold is not None:
        parse_cv_fold(cfg.cv_fold)
    if sorted(cfg.milestones) != list(cfg.milestones) or any(m <= 0 for m in cfg.milestones):
        raise ValueError(f"--milestones must be increasing positive epochs, got {cfg.milestones}")
    from nrcore.methods import get_method
    from nrcore.methods.base import check_number

    for opt in get_method(cfg.method).options:  # ranges are the methods' own; NaN/inf is never meant
        value = cfg.method_options.get(opt.name)
        if opt.type is float and value is not None:
            check_number(opt.name, value)


def amp_dtype_for(cfg: TrainConfig, device):
    """The autocast dtype of the run (None: full precision). `--amp` unset: off on the CPU (its
    convolutions gain little from bf16 and the bilevel methods' look-aheads lose precision),
    bf16 on a CUDA device that supports it (no loss scaling needed), else off."""
    import torch

    mode = cfg.amp
    if mode is None:
        device = torch.device(device)
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def parse_cv_fold(text: str) -> tuple:
    """"k/K" -> (k, K): fold k (1-based) of K held out."""
    try:
        k, K = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--cv-fold must be K/N, e.g. 2/5 (fold 2 of 5 held out), got {text!r}") from None
    if K < 2 or not 1 <= k <= K:
        raise ValueError(f"--cv-fold must be K/N with N >= 2 folds and 1 <= K <= N, got {text!r}")
    return k, K


def channels_last_for(cfg: TrainConfig, device) -> bool:
    """The run's memory layout: `--channels-last` when given, else the default for the device
    and the method with these options (nrcore.models.resolve_channels_last)."""
    from nrcore.methods import get_method
    from nrcore.models import resolve_channels_last

    return resolve_channels_last(cfg.channels_last, device, get_method(cfg.method).suits_channels_last(cfg.method_options))


def eval_batch_size_for(cfg: TrainConfig, device) -> int:
    """The evaluation batch size: `--eval-batch-size`, else 1000 on CUDA and 128 on the CPU, where
    batches of 1000 run 1.5-2x slower (their activations no longer fit the caches: the `cnn` on
    2,000 MNIST images 568 against 284 ms, ResNet-32 on 1,000 CIFAR images 2.1 against 1.1 s,
    2 threads). The results do not depend on it (eval mode)."""
    if cfg.eval_batch_size is not None:
        return cfg.eval_batch_size
    return 1000 if str(device).startswith("cuda") else 128


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of the initial learning rate during `epoch` (0-based)."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        import math

        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
