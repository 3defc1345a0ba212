"""Many processes through torchrun (gloo, CPU, 2 processes): the contract of nrcore.parallel.

* two steps of `ce`, `ebomlc`, `fbr` and `meta` under torchrun end where one process with the
  same global batch ends (parameters, optimiser state and per-example state, 1e-5 relative), on
  the BatchNorm-free `mlp` and on the `cnn` with `--sync-bn`;
* every registered method trains under torchrun, its ranks holding the same state after every
  epoch (the trainer checks it and stops otherwise);
* `torchrun ... -m nrcore train` writes the summary one process writes;
* killing a rank mid-run makes the other exit non-zero with a message, the checkpoint stays
  intact, and `--resume` in one process completes the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("torchrun_worker.py")
TWO_STEPS = dict(dataset="digits", noise="sym50", train_size=128, batch_size=64, epochs=1, clean_size=100, val_size=100, threads=1)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")  # fmt: skip


def torchrun(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` (as `python -m torch.distributed.run`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def run_plan(tmp_path: Path, plan) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    done = torchrun(str(WORKER), str(path), timeout=600)
    assert done.returncode == 0, stderr_ends(done.stderr)


def stderr_ends(text: str, size: int = 3000) -> str:
    """The start (each rank's progress, the first error) and the end (the launcher's verdict)."""
    return text if len(text) <= 2 * size else f"{text[:size]}\n[... {len(text) - 2 * size} characters ...]\n{text[-size:]}"


def one_process(cli, out: Path):
    from nrcore.train import resolve_config, train

    return train(resolve_config(cli=cli, cli_method_options={}), out)


def float_state(state, prefix=""):
    if isinstance(state, torch.Tensor):
        return {prefix: state} if state.is_floating_point() else {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(float_state(value, f"{prefix}/{key}"))
    return out


def assert_same_state(a_dir: Path, b_dir: Path, rtol: float = 1e-5) -> int:
    a = float_state(torch.load(a_dir / "checkpoint.pt", weights_only=True)["method"])
    b = float_state(torch.load(b_dir / "checkpoint.pt", weights_only=True)["method"])
    assert a.keys() == b.keys()
    for name in a:
        scale = float(b[name].double().abs().max()) if b[name].numel() else 0.0
        diff = float((a[name].double() - b[name].double()).abs().max()) if b[name].numel() else 0.0
        assert diff <= rtol * max(scale, 1e-12), f"{a_dir.name}: {name} differs by {diff:.3g} (max |value| {scale:.3g})"
    return len(a)


CONTRACT = [(m, model) for m in ("ce", "ebomlc", "fbr", "meta") for model in ("mlp", "cnn")]


def test_two_steps_under_torchrun_are_the_one_process_steps(tmp_path):
    plan = [{"cli": {**TWO_STEPS, "method": m, "model": model, "sync_bn": model == "cnn"}, "out": str(tmp_path / f"{m}-{model}-ranks")}
            for m, model in CONTRACT]  # fmt: skip
    run_plan(tmp_path, plan)
    for run in plan:
        ranks_dir = Path(run["out"])
        summary = json.loads((ranks_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["processes"] == 2
        assert sum(r["steps"] for r in map(json.loads, (ranks_dir / "metrics.jsonl").read_text().splitlines())) == 2
        single = one_process(run["cli"], tmp_path / ranks_dir.name.replace("-ranks", "-one"))
        compared = assert_same_state(ranks_dir, tmp_path / ranks_dir.name.replace("-ranks", "-one"))
        assert compared >= 4  # parameters, optimiser state, and the reweighting methods' weights
        assert summary["task"]["sizes"] == single["task"]["sizes"]
        if run["cli"]["method"] in ("fbr", "meta"):  # per-example state gathered from both ranks' slices
            weights = torch.load(ranks_dir / "checkpoint.pt", weights_only=True)["method"]["weights"]
            assert int((weights != 0.5).sum()) == 128  # every example of the two global batches moved


def test_every_method_trains_under_torchrun_with_its_ranks_in_step(tmp_path):
    from nrcore.methods import registry

    settings = {**TWO_STEPS, "train_size": 192, "epochs": 2, "model": "cnn"}
    plan = [{"cli": {**settings, "method": m}, "out": str(tmp_path / m)} for m in registry()]
    run_plan(tmp_path, plan)  # the trainer compares the ranks' state after every epoch and stops if they differ
    for run in plan:
        summary = json.loads((Path(run["out"]) / "summary.json").read_text())
        assert summary["status"] == "finished", (run["cli"]["method"], summary["status"])


def test_a_method_that_forgets_to_combine_its_ranks_is_stopped(tmp_path):
    """The trainer's check: a step that leaves the ranks apart (here: no gradient sum) fails the
    run after the epoch, naming the tensor, instead of training on silently."""
    plan = [{"cli": {**TWO_STEPS, "method": "ce", "model": "mlp"}, "out": str(tmp_path / "run"), "skip_grad_sum": True}]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    done = torchrun(str(WORKER), str(path), timeout=600)
    assert done.returncode != 0
    assert re.search(r"rank \d: the processes hold different model and method state after the epoch: (model|optimizer)\.", done.stderr)


def test_the_cli_under_torchrun_writes_the_one_process_summary(tmp_path):
    args = ["--method", "ce", "--model", "mlp", "--epochs", "2", "--threads", "1", "--noise", "sym50"]
    done = torchrun("-m", "nrcore", "train", *args, "--out", str(tmp_path / "ranks"), timeout=600)
    assert done.returncode == 0, stderr_ends(done.stderr)
    assert done.stdout.count("finished: ce on digits/sym50") == 1  # rank 0 reports, once
    ranks = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    from nrcore.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--out", str(tmp_path / "one"), "--quiet"])
    assert exit_info.value.code == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    for key in ("status", "method", "dataset", "noise", "noise_rate_realized", "seed", "epochs", "test_acc_last",
                "test_acc_best_val", "best_val_epoch", "val_acc_best", "test_acc_max", "task"):  # fmt: skip
        assert ranks[key] == one[key], key
    assert (ranks["processes"], one["processes"]) == (2, 1)
    last = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()][-1]
    last_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["train_loss"] == pytest.approx(last_one["train_loss"], rel=1e-5)


def _rank_pid(marker: str, rank: int):
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"NRCORE_TEST_MARK={marker}".encode() in env and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_killing_a_rank_stops_the_other_with_a_message_and_one_process_resumes(tmp_path):
    from nrcore.cli import main

    marker, out = uuid.uuid4().hex, tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "nrcore", "train",
           "--method", "ce", "--model", "cnn", "--epochs", "40", "--threads", "1", "--noise", "sym50", "--quiet", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NRCORE_TEST_MARK": marker}
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").is_file() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        victim = _rank_pid(marker, 1)
        assert victim is not None and launcher.poll() is None, "the run ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)  # bounded: the other rank must not hang
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "error: rank 0:" in stderr and "--resume" in stderr, stderr_ends(stderr)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("failed: RankLostError")
    done_epochs = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]  # intact, loadable
    assert 1 <= done_epochs < 40
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(out), "--quiet"])  # one process continues what two began
    assert exit_info.value.code == 0
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
