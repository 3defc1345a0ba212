"""Datasets in their official formats, noise models, the trusted/validation splits and fast
batching. See `docs/data.md` for the datasets, the folder layouts we accept, the noise specs,
the split rules and the label files a run saves.

    from nrcore.data import build_task
    task = build_task("mnist10k", data_dir="../shared/data", noise="sym50", clean_size=1000, val_size=1000, seed=1)
    for batch in task.loader("train", 100, shuffle=True, augment=True, generator=g, device="cuda"):
        ...   # batch.x, batch.y (noisy), batch.index, batch.y_true (analysis only)
"""

from nrcore.data.datasets import DATASETS, RawDataset, load_dataset
from nrcore.data.errors import DataError
from nrcore.data.noise import NoiseSpec
from nrcore.data.task import LABEL_FILES, build_task, load_task_labels, save_task_labels, task_from_dataset
from nrcore.data.types import Augmentation, Batch, BatchLoader, Split, Task

__all__ = [
    "DATASETS",
    "LABEL_FILES",
    "Augmentation",
    "Batch",
    "BatchLoader",
    "DataError",
    "NoiseSpec",
    "RawDataset",
    "Split",
    "Task",
    "build_task",
    "load_dataset",
    "load_task_labels",
    "save_task_labels",
    "task_from_dataset",
]
