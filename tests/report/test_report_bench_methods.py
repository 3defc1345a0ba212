"""bench/methods.py: layout suffixes (`variant@cl`, `variant@nchw`) and their ratios."""

import pytest


def test_layout_suffixes_pick_the_layout_and_the_baseline(bench_script):
    bm = bench_script("methods")
    assert bm.split_layout("meta:hypergrad=jvp@cl") == ("meta:hypergrad=jvp", True)
    assert bm.split_layout("mlc@nchw") == ("mlc", False)
    assert bm.split_layout("fbr") == ("fbr", None)
    assert (bm.baseline_of("mlc@nchw"), bm.baseline_of("fbr")) == ("ce@nchw", "ce")
    with pytest.raises(SystemExit, match="one of cl, nchw"):
        bm.split_layout("ce@nhwc")


def test_both_layouts_side_by_side_on_digits(bench_script, capsys):
    bm = bench_script("methods")
    bm.main(["--dataset", "digits", "--methods", "fbr@nchw,ce@cl,ce@nchw", "--steps", "1", "--warmup", "1", "--repeats", "1",
             "--no-memory", "--threads", "1"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == ["ce@nchw", "ce@cl", "fbr@nchw"]  # each layout's ce first, for the ratios
    assert rows["ce@cl"][1] == rows["ce@nchw"][1] == "1.00×"
    assert rows["fbr@nchw"][1].endswith("×") and rows["fbr@nchw"][1] != "failed"

    cl, nchw = bm.config_for(bm.parse_args([]), "ce@cl"), bm.config_for(bm.parse_args(["--no-channels-last"]), "ce@cl")
    assert cl.channels_last is True and nchw.channels_last is True  # the suffix wins over the flag
