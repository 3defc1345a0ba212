"""Hand-built run directories for the report tests (no training: the figures and the table are
tested on numbers we chose, so a failure points at the report code)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest


def write_run(
    root: Path,
    method: str,
    noise: str,
    seed: int,
    *,
    test_acc: Sequence[float],
    val_acc: Optional[Sequence[float]] = None,
    test_acc_best_val: Optional[float] = None,
    seconds_per_step: float = 0.01,
    weights: bool = False,
    label_correction: bool = False,
    status: Optional[str] = "finished",
    dataset: str = "digits",
    model: str = "cnn",
    method_options: Optional[dict] = None,
    batch_size: int = 64,
    threads: int = 1,
    name: Optional[str] = None,
    lr_drop_at: Optional[int] = None,
    phased: bool = False,
) -> Path:
    """A run directory shaped like the trainer's; `status=None` leaves out summary.json (a run
    still going or killed). `lr_drop_at`: 1-based epoch from which the lr is x0.1; `phased`: the
    first half of the epochs is phase 1 (as glc/forward log it)."""
    run_dir = root / (name or f"{dataset}-{noise}-{method}-seed{seed}")
    run_dir.mkdir(parents=True)
    epochs = len(test_acc)
    config = dict(
        method=method, dataset=dataset, noise=noise, model=model, seed=seed, epochs=epochs, batch_size=batch_size,
        lr=0.05, clean_size=100, val_size=100, device="cpu", threads=threads, method_options=method_options or {},
    )
    (run_dir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    records = []
    for e in range(epochs):
        lr = 0.005 if lr_drop_at is not None and e + 1 >= lr_drop_at else 0.05
        r = dict(epoch=e + 1, lr=lr, train_loss=1.0 / (e + 1), seconds=1.0, steps=100, test_acc=test_acc[e])
        if phased:
            r["phase"] = 1 if e < epochs // 2 else 2
        if val_acc is not None:
            r["val_acc"] = val_acc[e]
        if weights:
            r.update(weight_mean_clean=0.5 + 0.4 * e / epochs, weight_mean_noisy=0.5 - 0.4 * e / epochs,
                     weight_auroc=0.6 + 0.35 * (e + 1) / epochs)
        records.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    if weights:
        n, k = 400, 120
        is_noisy = rng.random(n) < 0.8
        final = np.where(is_noisy, rng.beta(1, 8, n), rng.beta(8, 1, n)).astype(np.float32)
        idx = np.sort(rng.choice(n, k, replace=False))
        t = np.linspace(0, 1, epochs + 1)[:, None]
        # alignment (all rise), filtering (noisy fall), post-filtering (flat)
        rise = 0.5 + 0.3 * np.minimum(t / 0.2, 1)
        traj = np.where(is_noisy[idx], rise * np.clip(1.5 - 2.5 * t, 0.05, 1), np.minimum(rise + t, 1.0))
        np.savez(run_dir / "weights.npz", final_weights=final, is_noisy=is_noisy, tracked_index=idx,
                 tracked_is_noisy=is_noisy[idx], trajectories=traj.astype(np.float32))
        # labels/ as the trainer saves them, consistent with is_noisy (10 classes)
        true = rng.integers(0, 10, n)
        given = np.where(is_noisy, (true + rng.integers(1, 10, n)) % 10, true)
        (run_dir / "labels").mkdir()
        np.save(run_dir / "labels" / "train_labels.npy", given)
        np.save(run_dir / "labels" / "train_true_labels.npy", true)
    if label_correction:
        c = 10
        true = rng.integers(0, c, 500)
        noisy = np.where(rng.random(500) < 0.8, (true + rng.integers(1, c, 500)) % c, true)
        corrected = np.where(rng.random(500) < 0.7, true, noisy)
        conf = np.zeros((c, c), np.int64)
        noisy_conf = np.zeros((c, c), np.int64)
        np.add.at(conf, (true, corrected), 1)
        np.add.at(noisy_conf, (true, noisy), 1)
        np.savez(run_dir / "label_correction.npz", confusion=conf, noisy_confusion=noisy_conf)

    if status is not None:
        summary = dict(
            status=status, method=method, dataset=dataset, noise=noise, model=model, seed=seed, epochs=epochs,
            noise_rate_nominal=0.8, noise_rate_realized=0.79,
            test_acc_last=test_acc[-1], test_acc_best_val=test_acc_best_val, test_acc_max=max(test_acc),
            best_val_epoch=1 + int(np.argmax(val_acc)) if val_acc is not None else None,
            weight_auroc_last=records[-1].get("weight_auroc"), seconds_per_step=seconds_per_step,
            device="cpu", threads=threads, config=config,
        )
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def make_run():
    """`write_run` itself, for tests that build their own run directories."""
    return write_run


@pytest.fixture
def synthetic_runs(tmp_path):
    """A small grid: ce, mlc (label correction), fbr (weights) and glc (two phases), 2 seeds,
    plus one unfinished run. Returns the folder holding them."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "ce", "sym80", seed, test_acc=[30, 40 + seed, 35 + seed], val_acc=[31, 45, 40], test_acc_best_val=40 + seed,
                  lr_drop_at=3)
        write_run(root, "fbr", "sym80", seed, test_acc=[50, 70, 80 + seed], val_acc=[50, 72, 81], test_acc_best_val=80 + seed,
                  weights=True, seconds_per_step=0.012)
        write_run(root, "mlc", "sym80", seed, test_acc=[40, 60, 70], val_acc=[40, 60, 70], test_acc_best_val=70,
                  label_correction=True, seconds_per_step=0.03)
        # the trainer picks the best-val epoch over both phases: epoch 2 (phase 1, test 40)
        write_run(root, "glc", "sym80", seed, test_acc=[30, 40, 35, 50, 60, 65], val_acc=[31, 70, 40, 50, 62, 60],
                  test_acc_best_val=40, phased=True)
    write_run(root, "fbr", "sym80", 2, test_acc=[50], status=None)
    return root


@pytest.fixture(scope="session")
def bench_script():
    """`bench_script(name)`: bench/<name>.py imported as the module `bench_<name>` (bench/ is not
    a package)."""
    return load_bench_script


def load_bench_script(name: str):
    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in it look their module up
    spec.loader.exec_module(module)
    return module
