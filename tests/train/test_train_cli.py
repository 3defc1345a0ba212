"""`nrcore` command line: option layering, one-line errors, listings."""

from __future__ import annotations

import json

import pytest

from nrcore.cli import main
from nrcore.train import resolve_config
from nrcore.train.config import DATASET_DEFAULTS


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "--method", "nope"], "unknown method 'nope'"),
        (["train", "--noise", "sym"], "sym"),
        (["train", "--dataset", "imagenet"], "unknown --dataset"),
        (["train", "--epochs", "abc"], "--epochs"),
        (["train", "--clean-size", "10", "--clean-frac", "0.1"], "at most one of --clean-size and --clean-frac"),
        (["train", "--dataset", "mnist", "--data-dir", "{tmp}"], "mnist"),
        (["train", "--preset", "no-such-preset"], "unknown --preset"),
        (["train", "--config", "{tmp}/missing.json"], "--config"),
        (["train", "--resume", "{tmp}/nothing-here"], "--resume"),
        (["train", "--lr", "nan"], "--lr must be > 0"),
        (["train", "--stop-after-epoch", "0"], "--stop-after-epoch must be >= 1"),
        (["train", "--noise", "sym0.2"], "for 20% write sym20"),
        (["train", "--gamma", "0"], "--gamma must be > 0"),
        (["train", "--method", "ebomlc", "--delta", "nan"], "--delta must be a finite number"),  # any method's float option
        (["train", "--method", "meta", "--beta", "inf"], "--beta must be a finite number"),
        (["train", "--method", "meta", "--beta", "-1"], "--beta must be >= 0"),
        (["train", "--method", "fbr", "--lambda-pos", "-1"], "--lambda-pos must be >= 0"),
        (["train", "--method", "fbr-ntk", "--lambda-neg", "-0.1"], "--lambda-neg must be >= 0"),
        (["train", "--method", "fbr", "--step-size", "-1"], "--step-size must be >= 0"),
        (["train", "--method", "mwnet", "--vnet-hidden", "0"], "--vnet-hidden must be >= 1"),
        (["train", "--method", "mwnet", "--vnet-lr", "0"], "--vnet-lr must be > 0"),
    ],
)
def test_bad_options_print_one_line_and_exit_nonzero(argv, fragment, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "run"), "--quiet"]
    code, out, err = _run(argv, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and fragment in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_method_option_for_another_method_is_rejected(capsys, tmp_path):
    from nrcore.methods import registry

    foreign = next(((n, o) for n, cls in registry().items() if n != "ce" for o in cls.options if o.type is not bool), None)
    if foreign is None:
        pytest.skip("no method with options registered yet")
    _, opt = foreign
    code, _, err = _run(["train", "--method", "ce", opt.flag, str(opt.default), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "does not apply to method 'ce'" in err


def test_config_layers_dataset_preset_file_cli(tmp_path):
    base = resolve_config(cli={"dataset": "mnist10k"}, cli_method_options={})
    for key, value in DATASET_DEFAULTS["mnist10k"].items():
        assert getattr(base, key) == value
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"dataset": "mnist10k", "epochs": 7, "lr": 0.01}))
    from_file = resolve_config(cli={}, cli_method_options={}, config_file=str(path))
    assert (from_file.dataset, from_file.epochs, from_file.lr) == ("mnist10k", 7, 0.01)
    cli_wins = resolve_config(cli={"epochs": 3}, cli_method_options={}, config_file=str(path))
    assert (cli_wins.epochs, cli_wins.lr) == (3, 0.01)


def test_presets_set_their_method_and_dataset_and_yield_to_flags():
    from nrcore.train.presets import all_presets

    presets = all_presets()
    if not presets:
        pytest.skip("no presets registered yet")
    name, values = next((n, v) for n, v in presets.items() if "method" in v)  # dataset presets: test_train_cifar10n_cpu
    cfg = resolve_config(cli={}, cli_method_options={}, preset=name)
    assert cfg.method == values["method"]
    if "dataset" in values:
        assert cfg.dataset == values["dataset"]
    cfg = resolve_config(cli={"epochs": 1}, cli_method_options={}, preset=name)
    assert cfg.epochs == 1


def test_methods_lists_every_registered_method_with_its_paper(capsys):
    from nrcore.methods import registry

    code, out, _ = _run(["methods"], capsys)
    assert code == 0
    for name, cls in registry().items():
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert cls.paper in line


def _flags_in(help_text):
    return {word.split("/")[0] for line in help_text.splitlines() for word in line.split()[:1] if word.startswith("--")}


def test_train_help_keeps_to_the_common_flags_and_says_where_the_rest_are(capsys):
    from nrcore.methods import registry

    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0 and "nrcore train --method M --help" in out
    method_flags = {opt.flag for cls in registry().values() for opt in cls.options}
    assert not _flags_in(out) & method_flags  # none of the methods' own flags
    assert {"--method", "--dataset", "--noise", "--train-size", "--resume"} <= _flags_in(out)
    assert len(out.splitlines()) < 130


@pytest.mark.parametrize("argv", [["--method", "ebomlc"], ["--method=ebomlc"], ["--preset", "ebomlc-cifar10"]])
def test_train_help_for_a_method_lists_exactly_its_own_flags(argv, capsys):
    from nrcore.methods import get_method, registry

    code, out, _ = _run(["train", *argv, "--help"], capsys)
    assert code == 0
    own = {opt.flag for opt in get_method("ebomlc").options}
    others = {opt.flag for cls in registry().values() for opt in cls.options} - own
    assert own <= _flags_in(out) and not _flags_in(out) & others
    assert "[ebomlc]" in out


def test_methods_with_a_name_lists_its_options_and_presets(capsys):
    from nrcore.methods import get_method

    code, out, _ = _run(["methods", "fbr"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("fbr ")
    for opt in get_method("fbr").options:
        assert opt.flag in out
    assert "preset fbr-cifar10" in out and "coteaching" not in out
    code, _, err = _run(["methods", "nope"], capsys)
    assert code != 0 and "unknown method 'nope'" in err


def test_hidden_method_flags_still_parse(tmp_path, capsys):
    code, _, err = _run(["train", "--method", "fbr", "--step-size", "0.5", "--epochs", "1", "--threads", "1", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["method_options"]["step_size"] == 0.5


def test_cli_train_end_to_end_quiet(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = _run(
        ["train", "--method", "ce", "--noise", "sym50", "--epochs", "1", "--threads", "1", "--no-channels-last", "--out", str(run_dir), "--quiet"], capsys
    )
    assert code == 0 and err == ""
    assert out.startswith("finished: ce on digits/sym50") and str(run_dir) in out
    assert (run_dir / "summary.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["channels_last"] is False
    assert json.loads((run_dir / "summary.json").read_text())["channels_last"] is False


@pytest.mark.parametrize(
    "cli, preset, expected",
    [
        ({"clean_frac": 0.1}, None, (None, 0.1)),  # digits' default is a clean_size
        ({"clean_size": 1000}, "ebomlc-cifar10", (1000, None)),  # the preset sets clean_frac
        ({"dataset": "mnist10k", "clean_size": 300}, None, (300, None)),
        ({}, "ebomlc-cifar10", (None, 0.02)),
    ],
)
def test_a_given_trusted_size_overrides_the_other_form_from_below(cli, preset, expected):
    cfg = resolve_config(cli=cli, cli_method_options={}, preset=preset)
    assert (cfg.clean_size, cfg.clean_frac) == expected


def test_only_one_layer_giving_both_trusted_size_forms_conflicts(tmp_path):
    with pytest.raises(ValueError, match=r"give at most one of --clean-size and --clean-frac \(the command line gives both\)"):
        resolve_config(cli={"clean_size": 10, "clean_frac": 0.1}, cli_method_options={})
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"clean_frac": 0.05}))
    cfg = resolve_config(cli={"clean_size": 50}, cli_method_options={}, config_file=str(config))
    assert (cfg.clean_size, cfg.clean_frac) == (50, None)


def test_a_bad_clean_frac_gets_its_range_error_not_the_conflict(tmp_path, capsys):
    code, _, err = _run(["train", "--clean-frac", "1.5", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code != 0 and "--clean-frac must be in (0, 1), got 1.5" in err
