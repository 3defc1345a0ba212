"""Hand-made run directories for the audit tests: labels/ and audit.npz with scores we chose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def write_audit_run(root: Path, *, given, true, signals, default, status="finished", val_acc_last=90.0, clean=0,
                    use_clean_in_train=False, num_classes=3, method="fbr", absent=None, audit_file=True) -> Path:
    """A finished run of `method` whose training split has labels `given` (true: `true`) and
    whose audit.npz holds `signals` {name: (scores, suggestions or None)}."""
    from nrcore.methods.base import ExampleSignal
    from nrcore.train.dynamics import write_audit_file

    root.mkdir(parents=True)
    given, true = np.asarray(given, dtype=np.int64), np.asarray(true, dtype=np.int64)
    (root / "config.json").write_text(json.dumps({"method": method, "dataset": "digits", "noise": "sym50", "seed": 0}))
    task = {"num_classes": num_classes, "sizes": {"train": len(given), "clean": clean}, "use_clean_in_train": use_clean_in_train}
    summary = {"status": status, "method": method, "dataset": "digits", "noise": "sym50", "seed": 0, "val_acc_last": val_acc_last, "task": task}
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "labels").mkdir()
    np.save(root / "labels" / "train_labels.npy", given)
    np.save(root / "labels" / "train_true_labels.npy", true)
    np.save(root / "labels" / "train_source_index.npy", np.arange(len(given)) + 100)
    if audit_file:
        made = {name: ExampleSignal(torch.tensor(score, dtype=torch.float64), None if sug is None else torch.tensor(sug), f"{name} test signal")
                for name, (score, sug) in signals.items()}  # fmt: skip
        write_audit_file(root, made, default=default, method=method, first_epoch=0, absent=absent or {})
    return root


@pytest.fixture
def audit_run():
    return write_audit_run
