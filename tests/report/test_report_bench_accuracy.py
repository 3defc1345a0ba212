"""bench/accuracy.py: the grid skips finished runs, resumes interrupted ones and refuses run
directories made with other settings. Tiny real trainings on digits (1-2 epochs of ce)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def accuracy(bench_script):
    return bench_script("accuracy")


def tiny(out, *extra):
    return ["--dataset", "digits", "--methods", "ce", "--noise", "sym50", "--seeds", "0", "--threads", "1", "--quiet", "--out", str(out), *extra]


def test_grid_trains_then_skips_finished_runs(accuracy, tmp_path, capsys):
    out = tmp_path / "grid"
    assert accuracy.main(tiny(out, "--epochs", "1")) == 0
    summary_path = out / "digits" / "sym50" / "ce" / "seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 1
    printed = capsys.readouterr().out
    assert "| digits" in printed and "| ce " in printed  # the nrcore table of the grid

    stamp = summary_path.stat().st_mtime_ns
    assert accuracy.main(tiny(out, "--epochs", "1")) == 0
    assert "1 done" in capsys.readouterr().out
    assert summary_path.stat().st_mtime_ns == stamp  # not trained again


def test_grid_resumes_an_interrupted_run(accuracy, tmp_path, capsys):
    from nrcore.train import train

    out = tmp_path / "grid"
    args = accuracy.parse_args(tiny(out, "--epochs", "2"))
    (run,), _ = accuracy.build_grid(args)
    train(run.cfg, run.run_dir, stop_after_epoch=1)  # as if the grid was killed after epoch 1
    first_epoch = (run.run_dir / "metrics.jsonl").read_text().splitlines()[0]

    assert accuracy.main(tiny(out, "--epochs", "2", "--dry-run")) == 0
    assert "1 resume" in capsys.readouterr().out
    assert accuracy.main(tiny(out, "--epochs", "2")) == 0
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert (run.run_dir / "metrics.jsonl").read_text().splitlines()[0] == first_epoch


def test_grid_refuses_a_run_dir_with_other_settings(accuracy, tmp_path, capsys):
    out = tmp_path / "grid"
    assert accuracy.main(tiny(out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert accuracy.main(tiny(out, "--epochs", "1", "--model", "mlp")) == 2
    assert "stale" in capsys.readouterr().out


def test_grid_counts_a_run_from_before_a_new_method_option_as_done(accuracy, tmp_path):
    """A finished run whose config lacks an option added since (at its default: the old
    behaviour) is the same run, not a stale one."""
    args = accuracy.parse_args(["--dataset", "digits", "--methods", "mwnet", "--noise", "sym50", "--seeds", "0", "--out", str(tmp_path)])
    (run,), _ = accuracy.build_grid(args)
    older = run.cfg.to_dict()
    del older["method_options"]["normalize_weights"]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.json").write_text(json.dumps(older))
    (run.run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert accuracy.classify(run) == ("done", "")
    older["method_options"]["vnet_hidden"] = 7  # a real difference still makes it stale
    (run.run_dir / "config.json").write_text(json.dumps(older))
    assert accuracy.classify(run)[0] == "stale"


def test_grid_spec_parsing(accuracy, capsys):
    from nrcore.methods import registry

    reg = registry()
    variant = accuracy.parse_variant("bootstrap:bootstrap_mode=hard", reg)
    assert variant.slug == "bootstrap_bootstrap-mode-hard"
    with pytest.raises(SystemExit, match="bootstrap_mode"):
        accuracy.parse_variant("bootstrap:bootstrap_mode=sideways", reg)
    with pytest.raises(SystemExit, match="expected option=value"):
        accuracy.parse_variant("ce:nope=1", reg)

    # the default grid is the protocol: every issue-4..6 method at sym80 and unif40, baselines at pair40
    args = accuracy.parse_args(["--dry-run", "--dataset", "mnist10k", "--data-dir", "/nonexistent"])
    runs, warnings = accuracy.build_grid(args)
    cells = {(r.variant.method, r.noise) for r in runs}
    for method in set(reg) & {"ce", "mlc", "mlc-d", "ebomlc", "meta", "fbr", "fbr-ntk", "l2rw", "mwnet", "glc", "coteaching"}:
        assert {(method, "sym80"), (method, "unif40")} <= cells
    assert ("ce", "pair40") in cells and {r.seed for r in runs} == {0, 1, 2}
    assert all(r.cfg.epochs == 30 and r.cfg.model == "cnn" and r.cfg.clean_frac == 0.02 for r in runs)
    missing = {"ce", "mlc", "mlc-d", "ebomlc", "meta", "fbr", "fbr-ntk", "l2rw", "mwnet"} - set(reg)
    assert bool(missing) == any("not registered" in w for w in warnings)
