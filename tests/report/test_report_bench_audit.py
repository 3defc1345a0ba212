"""bench/audit.py: cleanlab on out-of-fold posteriors against the one-run audit signals."""

from __future__ import annotations

import numpy as np
import pytest


def test_out_of_fold_posteriors_are_put_back_in_training_order(bench_script, tmp_path):
    audit = bench_script("audit")
    for k, (index, probs) in enumerate([([12, 10], [[0.9, 0.1], [0.2, 0.8]]), ([11], [[0.5, 0.5]])]):
        (tmp_path / f"f{k}").mkdir()
        np.savez(tmp_path / f"f{k}" / "audit.npz", holdout__probs=np.array(probs), holdout__source_index=np.array(index))
    probs = audit.out_of_fold_probs([tmp_path / "f0", tmp_path / "f1"], np.array([10, 11, 12]))
    assert probs.tolist() == [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]
    with pytest.raises(ValueError, match="cover 2 of 3"):
        audit.out_of_fold_probs([tmp_path / "f0"], np.array([10, 11, 12]))


def test_the_comparison_end_to_end_on_digits(bench_script, tmp_path, capsys):
    pytest.importorskip("cleanlab")
    audit = bench_script("audit")
    code = audit.main(["--dataset", "digits", "--noise", "sym50", "--methods", "ce,fbr", "--folds", "2", "--epochs", "2",
                       "--threads", "1", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("| digits")]
    assert any("cleanlab (K=2 ce runs" in line for line in lines)
    assert any("| fbr: weight_area |" in line for line in lines) and any("| ce: aum |" in line for line in lines)
    assert (tmp_path / "digits" / "sym50" / "ce_cv-fold-2-of-2" / "seed0" / "audit.npz").is_file()
