"""save_task_labels: a run's labels and split indices on disk, enough to audit and reproduce it;
task.info: what the run summary reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nrcore.data import LABEL_FILES, DataError, build_task, load_task_labels, save_task_labels


@pytest.fixture(scope="module")
def task():
    return build_task("digits", noise="sym50", clean_size=100, val_size=50, seed=3)


def test_saved_files_hold_every_split_and_the_matrix(task, tmp_path):
    written = save_task_labels(task, tmp_path)
    folder = tmp_path / "labels"
    for split in ("train", "clean", "val", "test"):
        for kind in ("labels", "true_labels", "source_index"):
            assert (folder / f"{split}_{kind}.npy").is_file()
    arrays = load_task_labels(tmp_path)
    assert np.array_equal(arrays["train_labels"], task.train.labels.numpy())
    assert np.array_equal(arrays["train_true_labels"], task.train.true_labels.numpy())
    assert np.array_equal(arrays["clean_source_index"], task.clean.source_index.numpy())
    assert np.allclose(arrays["transition_matrix"], task.transition_matrix.numpy())
    assert arrays["train_labels"].dtype == np.int64
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == set(written) and manifest["task_info"]["noise"] == "sym50"


def test_saved_labels_reproduce_the_run(task, tmp_path):
    save_task_labels(task, tmp_path)
    saved = load_task_labels(tmp_path)
    again = build_task("digits", noise="sym50", clean_size=100, val_size=50, seed=3)
    for split in ("train", "clean", "val", "test"):
        assert np.array_equal(saved[f"{split}_labels"], getattr(again, split).labels.numpy())
        assert np.array_equal(saved[f"{split}_source_index"], getattr(again, split).source_index.numpy())


def test_missing_splits_are_not_written(tmp_path):
    written = save_task_labels(build_task("digits"), tmp_path)
    assert "clean_labels.npy" not in written and "val_labels.npy" not in written and "train_labels.npy" in written


def test_every_file_name_is_documented(task, tmp_path):
    written = save_task_labels(task, tmp_path)
    documented = {p.replace("{split}", s) for p in LABEL_FILES for s in ("train", "clean", "val", "test")}
    assert set(written) <= documented


def test_loading_labels_from_a_folder_without_them_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no saved labels"):
        load_task_labels(tmp_path)


def test_info_holds_what_a_run_reports(task):
    info = task.info
    assert info["sizes"] == {"pool": 1437, "train": 1287, "train_noisy": 1287, "clean": 100, "val": 50, "test": 360, "holdout": 0}
    assert info["clean_per_class"] == [10] * 10 and sum(info["val_per_class"]) == 50
    assert info["noise_rate_nominal"] == 0.5 and abs(info["noise_rate_realized"] - 0.5) < 0.1
    assert info["seed"] == 3 and info["use_clean_in_train"] is False
    assert info["checksums_verified"] is None and info["data_files"] == []
    assert json.loads(json.dumps(info)) == info  # goes into summary.json as is


def test_info_lists_the_files_read_and_their_checksum_status(tmp_path, writers):
    writers.write_mnist(tmp_path / "mnist")
    task = build_task("mnist", data_dir=tmp_path, verify_checksums=False)
    paths = [f["path"] for f in task.info["data_files"]]
    assert len(paths) == 4 and all(p.startswith(str(tmp_path)) for p in paths)
    assert task.info["checksums_verified"] is False


def test_streamed_splits_save_their_image_keys(tmp_path, writers):
    writers.write_clothing1m(tmp_path / "clothing1m")
    task = build_task("clothing1m", data_dir=tmp_path, noise="real", clean_size=14)
    written = save_task_labels(task, tmp_path / "run")
    keys = written["train_keys.txt"].read_text().splitlines()
    assert keys == task.train.source.keys
    assert torch.equal(torch.from_numpy(load_task_labels(tmp_path / "run")["train_labels"]), task.train.labels)
