"""Fixtures shared by every test folder.

`run_tiny(method, noise="sym50", **settings)` trains `method` for a tiny run on scikit-learn's
bundled digits (offline, seconds) through the real trainer, checks the run directory has what
every run must have, and returns (summary, run_dir). Settings are train-config fields (epochs,
batch_size, clean_size, model, ...) or the method's own options.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors run faster on one thread, and CI's 2 cores are shared with the compiled
    kernels' own pool; $NRCORE_TEST_THREADS overrides."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("NRCORE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


TINY_SETTINGS = dict(dataset="digits", epochs=2, batch_size=64, clean_size=100, val_size=100, model="cnn", threads=1)

SUMMARY_KEYS = (
    "method", "dataset", "noise", "noise_rate_realized", "seed", "epochs", "test_acc_last", "test_acc_best_val",
    "test_acc_max", "seconds_per_epoch", "steps_per_second", "config", "status",
)


def check_run_dir(run_dir: Path, summary: dict, epochs: int) -> None:
    """What every finished run directory holds, whatever the method."""
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for r in records:
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 100
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "finished"
    for key in SUMMARY_KEYS:
        assert key in on_disk, f"summary.json lacks {key}"
    assert on_disk["test_acc_last"] == records[-1]["test_acc"]
    assert summary["test_acc_last"] == on_disk["test_acc_last"]


def _tiny_config(method: str, noise: str = "sym50", **settings):
    """The resolved config of a tiny digits run; `settings` mix trainer fields and the method's options."""
    from nrcore.methods import get_method
    from nrcore.train import resolve_config
    from nrcore.train.config import FIELDS

    own = {o.name for o in get_method(method).options}
    train_fields = {k: v for k, v in settings.items() if k in FIELDS}
    method_options = {k: v for k, v in settings.items() if k in own}
    unknown = set(settings) - set(train_fields) - set(method_options)
    assert not unknown, f"tiny run: unknown settings {unknown}"
    return resolve_config(cli={**TINY_SETTINGS, "method": method, "noise": noise, **train_fields}, cli_method_options=method_options)


@pytest.fixture
def tiny_config():
    return _tiny_config


@pytest.fixture
def run_tiny(tmp_path):
    def run(method: str, noise: str = "sym50", **settings):
        from nrcore.train import train

        cfg = _tiny_config(method, noise, **settings)
        run_dir = tmp_path / f"{method}-{noise}"
        summary = train(cfg, run_dir)
        check_run_dir(run_dir, summary, epochs=summary["epochs_planned"])
        return summary, run_dir

    return run


def shared_data_dir() -> Path:
    """The read-only real data (../shared/data), or $NRCORE_SHARED_DATA."""
    return Path(os.environ.get("NRCORE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def real_data_dir() -> Path:
    """shared_data_dir(), skipping the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} absent")
    return path
