"""`nrcore audit` and nrcore.audit on hand-made run directories with known answers."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from nrcore.audit import AuditError, average_precision, load_audit, score_run
from nrcore.cli import main

# six training examples, three classes; rows 1 and 4 are mislabelled
GIVEN = [0, 1, 2, 0, 2, 1]
TRUE = [0, 2, 2, 0, 1, 1]
SIGNALS = {
    "weight_area": ([0.1, 0.9, 0.2, 0.3, 0.8, 0.05], None),
    "final_prediction": ([0.2, 0.7, 0.1, 0.4, 0.6, 0.3], [0, 2, 2, 1, 1, 1]),
    "aum": ([0.0, 0.5, 0.6, -1.0, 0.7, 0.2], [0, 2, 0, 0, 1, 1]),
}


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture
def run(audit_run, tmp_path):
    return audit_run(tmp_path / "run", given=GIVEN, true=TRUE, signals=SIGNALS, default="weight_area")


def test_rows_are_ranked_most_suspect_first_with_the_suggestion(run):
    audit = load_audit(run)
    rows = audit.rows()
    assert [r["index"] for r in rows] == [1, 4, 3, 2, 0, 5]
    assert rows[0] == {"index": 1, "given_label": 1, "suggested_label": 2, "score": 0.9, "source": "weight_area", "source_index": 101}
    # weight_area has no suggestions of its own: the final model's prediction
    assert [r["suggested_label"] for r in rows] == [2, 1, 1, 2, 0, 1]
    assert [r["index"] for r in audit.rows("aum", top=2)] == [4, 2]
    arrays = score_run(run, "aum")
    assert arrays["index"].tolist() == [4, 2, 1, 5, 0, 3] and arrays["suggested_label"].tolist() == [1, 0, 2, 1, 0, 0]
    assert str(arrays["source"]) == "aum" and arrays["true_label"].tolist() == [1, 2, 2, 1, 0, 0]


def test_detection_metrics_by_hand(run):
    d = load_audit(run).detection("weight_area", flagged=3)
    # the two mislabelled rows have the two highest scores: perfect separation
    assert d["auroc"] == 1.0 and d["average_precision"] == 1.0
    assert d["precision_at_flagged"] == pytest.approx(2 / 3) and d["recall_at_flagged"] == 1.0
    a = load_audit(run).detection("aum", flagged=2)
    # aum ranks 4 (noisy), 2, 1 (noisy), 5, 0, 3: AP = (1/1 + 2/3) / 2; AUROC: noisy 0.7 beats all 4 clean,
    # noisy 0.5 beats 3 of 4 (0.0, 0.2, -1.0) -> 7/8
    assert a["average_precision"] == pytest.approx((1 + 2 / 3) / 2) and a["auroc"] == pytest.approx(7 / 8)
    assert a["precision_at_flagged"] == 0.5 and a["precision_at_mislabelled"] == 0.5


def test_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    assert average_precision(score, positive) == pytest.approx(average_precision_score(positive, score))


def test_the_flag_count_comes_from_the_final_model_and_the_validation_split(run):
    audit = load_audit(run)
    # the final model disagrees with 3 of 6 training labels (rows 1, 3, 4): D = 0.5; val acc 90%: E = 0.1;
    # rho = (D - E) / (1 - E C/(C-1)) = 0.4 / 0.85
    assert audit.estimated_noise_rate() == pytest.approx(0.4 / 0.85)
    assert audit.flag_count() == round(6 * 0.4 / 0.85) == 3


def test_export_changes_the_flagged_labels_but_never_a_trusted_one(audit_run, tmp_path):
    # rows 4 and 5 are trusted examples appended by --use-clean-in-train, and rank among the most suspect
    run = audit_run(tmp_path / "r", given=GIVEN, true=TRUE, signals={**SIGNALS, "weight_area": ([0.1, 0.9, 0.2, 0.3, 0.95, 0.99], None)},
                    default="weight_area", clean=2, use_clean_in_train=True)
    audit = load_audit(run)
    assert audit.trusted_rows.tolist() == [4, 5]
    labels, changed, flagged = audit.exported_labels()
    assert flagged == audit.flag_count() >= 1
    assert labels[4] == GIVEN[4] and labels[5] == GIVEN[5]
    assert labels[1] == 2 and changed == int((labels != np.asarray(GIVEN)).sum())


def test_cli_writes_the_csv_and_the_exported_labels(run, tmp_path, capsys):
    code, out, err = _run(["audit", str(run), "--out", str(tmp_path / "s.csv"), "--export-labels", str(tmp_path / "fixed.npy")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert list(rows[0]) == ["index", "given_label", "suggested_label", "score", "source", "source_index"]
    assert [int(r["index"]) for r in rows] == [1, 4, 3, 2, 0, 5]
    assert "AUROC 1.000" in out and "flagged: 3" in out
    fixed = np.load(tmp_path / "fixed.npy")
    assert fixed.tolist() == [0, 2, 2, 1, 1, 1]  # rows 1, 4, 3 flagged and changed to the final model's argmax


def test_list_signals_says_which_is_default_and_what_is_absent(audit_run, tmp_path, capsys):
    run = audit_run(tmp_path / "r", given=GIVEN, true=TRUE, signals={k: SIGNALS[k] for k in ("final_prediction", "aum")}, default="aum",
                    method="ce", absent={"weight": "ce keeps no per-example weights"})
    code, out, _ = _run(["audit", str(run), "--list-signals"], capsys)
    assert code == 0 and "aum (default):" in out and "weight: absent: ce keeps no per-example weights" in out
    code, _, err = _run(["audit", str(run), "--signal", "weight"], capsys)
    assert code != 0 and "has no signal 'weight' (ce keeps no per-example weights)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ar, p: ar(p, given=GIVEN, true=TRUE, signals=SIGNALS, default="aum", status="stopped after epoch 1"), "the run is not finished"),
        (lambda ar, p: p.mkdir(), "not a run directory"),
        (lambda ar, p: ar(p, given=GIVEN, true=TRUE, signals={}, default="aum", method="ce", audit_file=False), "saved no per-example signal"),
        (lambda ar, p: (ar(p, given=GIVEN, true=TRUE, signals={}, default="weight", audit_file=False), (p / "weights.npz").write_bytes(b"garbage")), "weights.npz: cannot read it"),
        (lambda ar, p: (ar(p, given=GIVEN, true=TRUE, signals=SIGNALS, default="aum"), (p / "audit.npz").write_bytes(b"PK\x03\x04broken")), "audit.npz: cannot read it"),
        (lambda ar, p: ar(p, given=GIVEN, true=TRUE, signals=SIGNALS, default="aum", val_acc_last=None), "no clean validation split"),
    ],
    ids=["unfinished", "not-a-run", "no-signal", "corrupt-weights", "corrupt-audit", "no-val-for-export"],
)
def test_bad_input_is_one_line_and_writes_nothing(make, message, audit_run, tmp_path, capsys):
    run = tmp_path / "bad"
    make(audit_run, run)
    out_csv, out_npy = tmp_path / "s.csv", tmp_path / "l.npy"
    code, _, err = _run(["audit", str(run), "--out", str(out_csv), "--export-labels", str(out_npy)], capsys)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out_csv.exists() and not out_npy.exists()


def test_an_old_run_with_only_weights_is_audited_by_its_final_weights(audit_run, tmp_path):
    run = audit_run(tmp_path / "old", given=GIVEN, true=TRUE, signals={}, default="weight", audit_file=False)
    np.savez(run / "weights.npz", final_weights=np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.95]))
    audit = load_audit(run)
    assert audit.default == "weight" and [r["index"] for r in audit.rows()][:2] == [1, 4]
    assert any("no audit.npz" in n for n in audit.notes)
    assert {r["suggested_label"] for r in audit.rows()} == {-1}  # no predictions saved: no suggestion
    with pytest.raises(AuditError, match="saved no suggested labels"):
        audit.exported_labels()


def test_audit_of_a_real_tiny_run(run_tiny, capsys):
    summary, run_dir = run_tiny("coteaching", noise="sym50", epochs=2, num_gradual=1)
    code, out, err = _run(["audit", str(run_dir), "--top", "5"], capsys)
    assert code == 0, err
    assert "ranked by drop_rate" in out and "AUROC" in out
    assert len([line for line in out.splitlines() if line[:1].isdigit()]) == 5
    meta = json.loads(str(np.load(run_dir / "audit.npz")["meta"]))
    assert meta["default"] == "drop_rate"
