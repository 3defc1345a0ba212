"""The CPU protocol for natural images and real human noise: `cifar10n-cpu` (a class-balanced
10,000-image subset of CIFAR-10 with its CIFAR-10N labels, ResNet-8), and --train-size through
the trainer and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from nrcore.cli import main
from nrcore.train import resolve_config
from nrcore.train.config import DATASET_DEFAULTS


def test_the_dataset_resolves_to_the_protocol():
    cfg = resolve_config(cli={"dataset": "cifar10n-cpu", "method": "fbr", "noise": "worst"}, cli_method_options={})
    assert (cfg.model, cfg.train_size, cfg.data_seed, cfg.clean_frac, cfg.val_size) == ("resnet8", 10000, 0, 0.02, 0.02)
    assert cfg.epochs <= 40 and cfg.method == "fbr"


def test_the_preset_is_the_dataset_with_its_defaults_and_selects_no_method():
    by_preset = resolve_config(cli={"method": "glc", "noise": "aggre"}, cli_method_options={}, preset="cifar10n-cpu")
    by_dataset = resolve_config(cli={"dataset": "cifar10n-cpu", "method": "glc", "noise": "aggre"}, cli_method_options={})
    assert by_preset == by_dataset
    # flags still win over the preset
    smaller = resolve_config(cli={"train_size": 2000, "epochs": 3}, cli_method_options={}, preset="cifar10n-cpu")
    assert (smaller.train_size, smaller.epochs, smaller.method) == (2000, 3, "ce")


def test_the_paper_presets_keep_the_full_training_set():
    for preset in ("ebomlc-cifar10", "fbr-cifar10"):
        cfg = resolve_config(cli={}, cli_method_options={}, preset=preset)
        assert cfg.train_size is None and cfg.model in ("resnet32", "resnet34")
    assert DATASET_DEFAULTS["cifar10n"]["model"] == "resnet32"


def test_resnet8_is_the_six_n_plus_two_resnet_with_one_block_per_stage():
    from nrcore.models import build_model

    model = build_model("resnet8", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7 and sum(p.numel() for p in model.parameters()) < 100_000  # 7 convs + the classifier
    logits, feats = model(torch.zeros(2, 3, 32, 32), return_features=True)
    assert logits.shape == (2, 10) and feats.shape == (2, model.feature_dim) == (2, 64)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--train-size", "0"], "--train-size must be > 0"),
        (["--dataset", "digits", "--train-size", "5000"], "--train-size 5000 exceeds the 1437 training examples of digits"),
        (["--dataset", "digits", "--train-size", "1400"], "--train-size 1400 needs 140 examples of class 8 (8) but digits has 139; at most 1390"),
        (["--dataset", "digits", "--train-size", "1300"], "the trusted set needs 10 examples of class 8 but only 9 are available outside the --train-size 1300 subset"),
    ],
)
def test_bad_train_sizes_are_one_line_errors_naming_the_flag(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv, "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_digits_run_on_a_subset_records_it(run_tiny):
    summary, run_dir = run_tiny("ce", train_size=600, data_seed=3)
    assert summary["task"]["sizes"]["train"] == 600
    assert summary["task"]["train_subset"]["data_seed"] == 3 and summary["config"]["data_seed"] == 3
    manifest = json.loads((run_dir / "labels" / "manifest.json").read_text())
    assert manifest["task_info"]["train_subset"] == summary["task"]["train_subset"]


@pytest.mark.realdata
def test_a_tiny_cifar10n_cpu_run_on_the_real_files_resumes_exactly(tmp_path, real_data_dir):
    """A few hundred real CIFAR-10 images with their CIFAR-10N `worst` labels, two epochs with a
    stop and a resume in between; skipped without ../shared/data."""
    from nrcore.train import train

    data = real_data_dir
    if not (data / "cifar10" / "cifar10.npz").is_file() or not (data / "cifar-n" / "CIFAR-10_human.pt").is_file():
        pytest.skip(f"no CIFAR-10 / CIFAR-10N files in {data}")
    cli = dict(dataset="cifar10n-cpu", data_dir=str(data), method="ce", noise="worst", train_size=300, clean_size=50,
               val_size=50, epochs=2, batch_size=50, threads=1, eval_batch_size=500)  # fmt: skip
    cfg = resolve_config(cli=cli, cli_method_options={})
    whole = train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "cut", stop_after_epoch=1)
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert whole["status"] == resumed["status"] == "finished"
    assert whole["test_acc_last"] == resumed["test_acc_last"]
    task = whole["task"]
    assert task["sizes"] == {"pool": 50000, "train": 300, "train_noisy": 300, "clean": 50, "val": 50, "test": 10000, "holdout": 0}
    assert 0.3 < task["noise_rate_realized"] < 0.5  # CIFAR-10N worst: 40.2% over all 50,000
    assert task["train_subset"]["per_class"] == [30] * 10
