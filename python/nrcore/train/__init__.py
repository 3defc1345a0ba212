"""The shared trainer: `train(cfg, run_dir)` runs one method on one task (see trainer.py)."""

from nrcore.train.config import DATASET_DEFAULTS, TrainConfig, resolve_config
from nrcore.train.trainer import NonFiniteLossError, Trainer, build_run_task, train

__all__ = ["DATASET_DEFAULTS", "NonFiniteLossError", "TrainConfig", "Trainer", "build_run_task", "resolve_config", "train"]
