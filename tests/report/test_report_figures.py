"""`nrcore report`: every figure renders from hand-built run directories as a readable PNG."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from click.testing import CliRunner

from nrcore.report.figures import render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ("accuracy", "weight-auroc", "trajectories", "weight-hist", "weight-pairs", "label-correction")


def check_png(path):
    from PIL import Image
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        width, height = im.size
    assert width > 300 and height > 200, f"{path.name} is only {width}x{height}"
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01, f"{path.name} is blank"


def test_every_figure_renders(synthetic_runs, tmp_path):
    report = render_report([synthetic_runs], tmp_path / "out")
    names = sorted(p.name for p in report.figures)
    for kind in KINDS:
        assert any(n.startswith(kind + "_") for n in names), f"no {kind} figure among {names}"
    for path in report.figures:
        check_png(path)

    index = report.index.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index)
    assert sorted(linked) == names
    assert "| ce " in index and "fbr" in index  # the table is in the index too
    # the unfinished seed-2 run is skipped, and said so
    assert any("seed2" in n and "no summary.json" in n for n in report.notes)
    assert "seed2" in index


def test_phased_runs_plot_their_second_phase(synthetic_runs):
    from nrcore.report.figures import _lr_drops, _series
    from nrcore.report.runs import find_runs

    runs = {(r.method, r.seed): r for r in find_runs([synthetic_runs])}
    x, y = _series(runs["glc", 0], "test_acc")
    assert list(x) == [1, 2, 3] and list(y) == [50, 60, 65]  # epochs 4-6 drawn as 1-3
    assert runs["glc", 0].best_val_epoch == 2  # epoch 5 = phase-2 epoch 2
    assert _lr_drops([runs["ce", 0]]) == [2.5]  # lr x0.1 from epoch 3: a line between 2 and 3


def test_per_run_figures_lowest_seed_unless_every_seed(synthetic_runs, tmp_path):
    default = render_report([synthetic_runs], tmp_path / "a")
    every = render_report([synthetic_runs], tmp_path / "b", every_seed=True)
    per_run = lambda rep: sorted(p.name for p in rep.figures if p.name.startswith(KINDS[2:]))
    assert all("seed0" in n for n in per_run(default)) and len(per_run(default)) == 4
    assert len(per_run(every)) == 8 and any("seed1" in n for n in per_run(every))


def test_single_run_without_validation_split(make_run, tmp_path):
    run_dir = make_run(tmp_path / "runs", "ce", "clean", 3, test_acc=[90.0, 95.0])
    report = render_report([run_dir], tmp_path / "out")
    assert [p.name for p in report.figures] == ["accuracy_digits_clean_cnn.png"]
    check_png(report.figures[0])
    assert report.notes == []


def test_report_cli(synthetic_runs, tmp_path):
    from nrcore.cli import cli

    out = tmp_path / "cli-out"
    result = CliRunner().invoke(cli, ["report", str(synthetic_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "figures" in result.output and (out / "index.md").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["report", str(empty), "--out", str(out)])
    assert result.exit_code != 0 and "no run directories" in result.output


def test_matplotlib_not_imported_by_package_or_cli():
    code = "import sys, nrcore, nrcore.cli, nrcore.report, nrcore.report.cli; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_damaged_artifact_is_a_note_not_a_crash(synthetic_runs, tmp_path):
    (synthetic_runs / "digits-sym80-mlc-seed0" / "label_correction.npz").write_bytes(b"not an npz")
    report = render_report([synthetic_runs], tmp_path / "out")
    assert any("label correction heatmap" in n and "mlc-seed0" in n for n in report.notes)
    assert not any(p.name.startswith("label-correction") for p in report.figures)
    assert any(p.name.startswith("trajectories") for p in report.figures)


def test_weight_by_label_pair_means_and_counts():
    from nrcore.report.figures import weight_by_label_pair

    weights = np.array([1.0, 0.5, 0.0, 0.2, 0.4, 0.9, 0.3])
    given = np.array([0, 0, 1, 1, 2, 2, 1])
    true = np.array([0, 0, 0, 1, 1, 2, -1])  # the last one's true label is unknown: left out
    means, counts = weight_by_label_pair(weights, given, true, 3)
    assert counts.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    expected = np.array([[0.75, 0.0, np.nan], [np.nan, 0.2, 0.4], [np.nan, np.nan, 0.9]])
    np.testing.assert_allclose(means, expected)  # NaN where a pair has no example
    with pytest.raises(ValueError, match="7 weights but 6 training labels"):
        weight_by_label_pair(weights, given[:6], true, 3)


def test_weight_pairs_figure_needs_true_labels(synthetic_runs, tmp_path):
    """Runs without known true labels (e.g. real noisy labels with no clean version) get a note
    instead of the figure; runs without labels/ simply have none."""
    np.save(synthetic_runs / "digits-sym80-fbr-seed0" / "labels" / "train_true_labels.npy", np.full(400, -1))
    shutil.rmtree(synthetic_runs / "digits-sym80-fbr-seed1" / "labels")
    report = render_report([synthetic_runs], tmp_path / "out", every_seed=True)
    assert any("weight by label pair" in n and "fbr-seed0" in n and "unknown" in n for n in report.notes)
    assert not any(p.name.startswith("weight-pairs") for p in report.figures)
    assert not any("fbr-seed1" in n for n in report.notes)


def test_figure_legends_count_a_copied_run_once(synthetic_runs, tmp_path, monkeypatch):
    import nrcore.report.figures as figures

    shutil.copytree(synthetic_runs / "digits-sym80-ce-seed0", synthetic_runs / "ce-copy")
    legends = []
    original = figures._legend_right
    monkeypatch.setattr(figures, "_legend_right", lambda fig, handles, names: (legends.append(list(names)), original(fig, handles, names)))
    report = render_report([synthetic_runs], tmp_path / "out")
    accuracy = next(names for names in legends if any(n.startswith("ce ") for n in names))
    assert "ce (2 seeds)" in accuracy, accuracy
    assert any("ce-copy" in n and "counted once" in n for n in report.notes)


def test_a_run_with_audit_signals_gets_a_precision_recall_figure(run_tiny, tmp_path):
    _, run_dir = run_tiny("fbr", noise="sym50", epochs=2)
    report = render_report([run_dir], tmp_path / "out")
    figures = [p for p in report.figures if p.name.startswith("label-issues")]
    assert len(figures) == 1, [p.name for p in report.figures]
    check_png(figures[0])
    assert figures[0].name in (tmp_path / "out" / "index.md").read_text()
