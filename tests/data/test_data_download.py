"""The optional download path: only through torchvision, only when asked, never at import."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from nrcore.data import DataError, build_task


@pytest.fixture
def fake_torchvision(monkeypatch, writers):
    """A stand-in torchvision whose MNIST writes tiny idx files where torchvision puts them."""
    calls = []

    class MNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            writers.write_mnist(__import__("pathlib").Path(root) / "MNIST" / "raw")

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = MNIST
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def test_download_fetches_missing_files_into_a_searched_layout(tmp_path, fake_torchvision):
    task = build_task("mnist", data_dir=tmp_path / "new", download=True, verify_checksums=False)
    assert len(task.train) == 200
    assert [c[1] for c in fake_torchvision] == [True, False] and all(c[2] for c in fake_torchvision)
    assert "MNIST/raw" in task.info["data_files"][0]["path"]


def test_download_is_skipped_when_the_files_are_there(tmp_path, writers, fake_torchvision):
    writers.write_mnist(tmp_path / "mnist")
    build_task("mnist", data_dir=tmp_path, download=True, verify_checksums=False)
    assert fake_torchvision == []


def test_download_without_torchvision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision raises ImportError
    with pytest.raises(DataError) as err:
        build_task("cifar10", data_dir=tmp_path, download=True)
    message = str(err.value)
    assert "torchvision" in message and "cifar-10-batches-py" in message and "\n" not in message


def test_datasets_torchvision_does_not_know_cannot_be_downloaded(tmp_path, fake_torchvision):
    with pytest.raises(DataError, match="cannot fetch"):
        build_task("clothing1m", data_dir=tmp_path, noise="real", download=True)


def test_importing_the_data_layer_imports_no_optional_package():
    code = "import sys, nrcore.data; bad = {'torchvision', 'sklearn', 'PIL'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
