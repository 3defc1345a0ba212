"""mlc, mlc-d and ebomlc end to end on digits through the real trainer: run directory,
label_correction.npz, per-step stats, presets, and an exact resume for ebomlc."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nrcore.train import resolve_config, train
from nrcore.train.presets import all_presets

STATS = {"mlc": ("upper_loss", "hypergrad_sq", "skipped"), "mlc-d": ("beta", "grad_q_sq", "upper_loss", "skipped"), "ebomlc": ("beta", "grad_q_sq", "upper_loss", "skipped")}


@pytest.mark.parametrize("method", ["mlc", "mlc-d", "ebomlc"])
def test_tiny_run_writes_label_correction_confusion(run_tiny, method):
    summary, run_dir = run_tiny(method, noise="sym50", epochs=1, inner_steps=2 if method == "mlc-d" else 1)
    labels = json.loads((run_dir / "config.json").read_text())
    assert labels["method"] == method
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in STATS[method]:
        assert np.isfinite(record[key]), key
    assert record["skipped"] == 0
    assert summary["channels_last"] is (method != "mlc")  # mlc's double backprop keeps the default layout

    with np.load(run_dir / "label_correction.npz") as f:
        assert sorted(f.files) == ["confusion", "noisy_confusion"]
        confusion, noisy = f["confusion"], f["noisy_confusion"]
    C = 10
    assert confusion.dtype == np.int64 and noisy.dtype == np.int64
    assert confusion.shape == noisy.shape == (C, C)
    # both count every training example once, per true class
    np.testing.assert_array_equal(confusion.sum(1), noisy.sum(1))
    assert confusion.sum() == summary["task"]["sizes"]["train"]
    # noisy_confusion is the realised noise: off-diagonal mass ~ the realised noise rate
    off_diagonal = 1 - np.trace(noisy) / noisy.sum()
    assert off_diagonal == pytest.approx(summary["noise_rate_realized"], abs=1e-9)
    if method != "mlc":  # mlc's main model learns only once g_α does (tens of epochs here)
        assert summary["test_acc_last"] > 30


def test_ebomlc_resume_repeats_an_uninterrupted_run(tmp_path):
    settings = dict(dataset="digits", method="ebomlc", noise="sym50", epochs=2, batch_size=64, clean_size=100, val_size=100, threads=1)
    cfg = resolve_config(cli=settings, cli_method_options={})
    full = train(cfg, tmp_path / "full")
    stopped = train(cfg, tmp_path / "split", stop_after_epoch=1)
    assert stopped["epochs"] == 1 and stopped["status"].startswith("stopped")
    assert not (tmp_path / "split" / "label_correction.npz").exists()
    resumed = train(cfg, tmp_path / "split", resume=True)

    def records(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if "seconds" not in k and k != "steps_per_second"} for r in rows]

    assert records("split") == records("full")
    for key in ("test_acc_last", "test_acc_best_val", "val_acc_last"):
        assert resumed[key] == full[key]
    a, b = (np.load(tmp_path / run / "label_correction.npz") for run in ("full", "split"))
    np.testing.assert_array_equal(a["confusion"], b["confusion"])
    state_a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["method"]
    state_b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["method"]
    for part in ("model", "meta_model"):
        for name, tensor in state_a[part].items():
            assert torch.equal(tensor, state_b[part][name]), f"{part}.{name}"


def test_paper_presets():
    presets = all_presets()
    for method in ("mlc", "mlc-d", "ebomlc"):
        for dataset in ("cifar10", "cifar100"):
            p = presets[f"{method}-{dataset}"]
            assert p["method"] == method and p["dataset"] == dataset
            assert (p["model"], p["epochs"], p["lr"], p["momentum"], p["weight_decay"]) == ("resnet32", 120, 0.1, 0.9, 5e-4)
            assert (p["milestones"], p["gamma"], p["batch_size"], p["clean_frac"], p["meta_lr"]) == ([80, 100], 0.1, 100, 0.02, 3e-4)
    assert {k: presets["ebomlc-cifar10"][k] for k in ("xi", "rho", "delta")} == {"xi": 0.5, "rho": 0.2, "delta": 0.25}
    cfg = resolve_config(cli={}, cli_method_options={}, preset="ebomlc-cifar100")
    assert cfg.method == "ebomlc" and cfg.method_options["inner_steps"] == 1
    assert resolve_config(cli={"method": "mlc-d"}, cli_method_options={}).method_options["inner_steps"] == 5


@pytest.mark.parametrize(
    "method,bad,match",
    [("ebomlc", {"rho": 0.0}, "--rho"), ("ebomlc", {"xi": -1.0}, "--xi"), ("mlc-d", {"inner_steps": 0}, "--inner-steps"),
     ("mlc", {"inner_steps": 0}, "--inner-steps"), ("mlc", {"meta_lr": 0.0}, "--meta-lr")],
)
def test_bad_options_are_rejected(method, bad, match):
    from nrcore.methods import get_method

    cls = get_method(method)
    with pytest.raises(ValueError, match=match):
        cls(None, **{**{o.name: o.default for o in cls.options}, **bad})
