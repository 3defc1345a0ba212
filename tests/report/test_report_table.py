"""`nrcore table`: numbers checked against means and sample standard deviations by hand."""

from __future__ import annotations

import csv
import io
import math

import pytest
from click.testing import CliRunner

from nrcore.report.runs import Run, method_label
from nrcore.report.table import make_table


def rows_by_method(text):
    return {r["method"]: r for r in csv.DictReader(io.StringIO(text))}


def test_means_stds_and_time_ratios(synthetic_runs):
    text, notes = make_table([synthetic_runs], "csv")
    rows = rows_by_method(text)
    assert list(rows) == ["ce", "fbr", "glc", "mlc"]  # ce first

    ce, fbr, mlc = rows["ce"], rows["fbr"], rows["mlc"]
    # ce: last-epoch test acc 35 and 36 -> mean 35.5, sample std sqrt(((0.5)^2 * 2) / 1) = 0.7071
    assert float(ce["test_acc_last_mean"]) == pytest.approx(35.5)
    assert float(ce["test_acc_last_std"]) == pytest.approx(math.sqrt(0.5))
    assert float(ce["test_acc_best_val_mean"]) == pytest.approx(40.5)
    assert float(fbr["test_acc_last_mean"]) == pytest.approx(80.5)
    assert float(mlc["test_acc_last_std"]) == 0.0
    # seeds: the unfinished seed-2 fbr run is not counted
    assert fbr["seeds"] == "2" and fbr["seed_list"] == "[0,1]"
    assert any("seed2" in n for n in notes)
    # weight AUROC only for the weighted method: last epoch 0.6 + 0.35 = 0.95
    assert float(fbr["weight_auroc_mean"]) == pytest.approx(0.95) and ce["weight_auroc_mean"] == ""
    # glc has two phases: its best-val epoch is picked in phase 2 (epoch 5: test 60), not the
    # trainer's pick over both phases (epoch 2, a plain noisy-label model: test 40)
    assert float(rows["glc"]["test_acc_best_val_mean"]) == 60.0
    # time per step relative to ce: 0.012 / 0.010 and 0.03 / 0.01
    assert float(ce["time_vs_ce"]) == pytest.approx(1.0)
    assert float(fbr["time_vs_ce"]) == pytest.approx(1.2)
    assert float(mlc["time_vs_ce"]) == pytest.approx(3.0)


def test_markdown(synthetic_runs):
    text, _ = make_table([synthetic_runs], "md")
    assert "| ce " in text and "35.50 ± 0.71" in text and "1.20×" in text
    assert "ddof=1" in text  # the legend says which std
    assert "skipped" in text and "seed2" in text


def test_single_seed_and_missing_best_val(make_run, tmp_path):
    make_run(tmp_path, "ce", "sym50", 0, test_acc=[50.0, 60.0], seconds_per_step=0.02)
    text, _ = make_table([tmp_path], "md")
    line = next(l for l in text.splitlines() if l.startswith("| digits"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4:7] == ["1", "60.00", "n/a"]  # one seed: no ±; no validation split: no best-val number
    assert cells[8:] == ["20.0", "1.00×"]


def test_no_ratio_without_comparable_ce(make_run, tmp_path):
    make_run(tmp_path, "ce", "sym50", 0, test_acc=[50.0], threads=2)
    make_run(tmp_path, "toy", "sym50", 0, test_acc=[55.0], threads=1)
    make_run(tmp_path, "toy", "sym20", 0, test_acc=[70.0], threads=1)
    text, _ = make_table([tmp_path], "csv")
    for row in csv.DictReader(io.StringIO(text)):
        if row["method"] == "toy":
            assert row["time_vs_ce"] == ""  # ce ran with other threads (sym50) or not at all (sym20)


def test_ablations_and_other_settings_get_their_own_rows(make_run, tmp_path):
    make_run(tmp_path, "toy", "sym80", 0, test_acc=[60.0, 70.0])
    make_run(tmp_path, "toy", "sym80", 1, test_acc=[60.0, 72.0])
    make_run(tmp_path, "toy", "sym80", 0, test_acc=[40.0, 50.0], method_options={"center": False}, name="no-center")
    make_run(tmp_path, "toy", "sym80", 0, test_acc=[40.0, 50.0, 55.0], name="three-epochs")
    rows = rows_by_method(make_table([tmp_path], "csv")[0])
    assert set(rows) == {"toy [epochs=2]", "toy [epochs=3]", "toy --no-center"}
    assert rows["toy [epochs=2]"]["seeds"] == "2" and float(rows["toy [epochs=2]"]["test_acc_last_mean"]) == 71.0


def test_method_label_shows_non_default_options_as_flags(tmp_path):
    defaults = {"fbr": {"center": True, "step_size": 0.1, "row_shift": True}}
    run = lambda opts: Run(tmp_path, {"method": "fbr", "method_options": opts}, None)
    assert method_label(run({"center": True, "step_size": 0.1, "row_shift": True}), defaults) == "fbr"
    assert method_label(run({"center": True, "step_size": 0.5, "row_shift": False}), defaults) == "fbr --no-row-shift --step-size 0.5"


def test_table_cli_errors(tmp_path):
    from nrcore.cli import cli

    result = CliRunner().invoke(cli, ["table", str(tmp_path)])
    assert result.exit_code != 0 and "no run directories" in result.output


def test_a_copied_run_counts_once_and_the_note_says_which(make_run, tmp_path):
    import shutil

    first = make_run(tmp_path / "runs", "ce", "sym80", 0, test_acc=[50.0, 60.0], val_acc=[50.0, 61.0], test_acc_best_val=60.0)
    make_run(tmp_path / "runs", "ce", "sym80", 1, test_acc=[50.0, 64.0], val_acc=[50.0, 61.0], test_acc_best_val=64.0)
    shutil.copytree(first, tmp_path / "runs" / "zz-copy")
    text, notes = make_table([tmp_path / "runs"], "csv")
    row = rows_by_method(text)["ce"]
    assert row["seeds"] == "2" and row["seed_list"] == "[0,1]"
    assert float(row["test_acc_last_mean"]) == pytest.approx(62.0)  # not (60 + 60 + 64) / 3
    assert [n for n in notes if "zz-copy" in n] == [
        f"skipped {(tmp_path / 'runs' / 'zz-copy').resolve()}: the same run as {first.resolve()} (same settings, seed 0); "
        f"counted once, using {first.resolve()}"
    ]


def test_the_same_seed_with_other_settings_is_not_a_duplicate(make_run, tmp_path):
    make_run(tmp_path, "ce", "sym80", 0, test_acc=[50.0], name="bs64")
    make_run(tmp_path, "ce", "sym80", 0, test_acc=[52.0], name="bs32", batch_size=32)
    text, notes = make_table([tmp_path], "csv")
    assert len(list(csv.DictReader(io.StringIO(text)))) == 2 and not notes  # two rows, one per batch size
