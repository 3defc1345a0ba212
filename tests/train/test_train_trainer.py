"""The shared trainer: run directory, exact resume, divergence handling, atomic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from nrcore.methods import Method, StepOutput
from nrcore.methods.base import _REGISTRY, register
from nrcore.train import NonFiniteLossError, resolve_config, train
from nrcore.train import checkpoint as ckpt_mod
from nrcore.train.metrics import auroc

TINY = dict(dataset="digits", epochs=3, batch_size=64, clean_size=100, val_size=100, model="cnn", threads=1)


def _cfg(**over):
    method_options = over.pop("method_options", {})
    return resolve_config(cli={**TINY, **over}, cli_method_options=method_options)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_stop_matches_uninterrupted_run(tmp_path):
    cfg = _cfg(method="ce", noise="sym50")
    full = train(cfg, tmp_path / "full")
    first = train(cfg, tmp_path / "split", stop_after_epoch=1)
    assert first["status"].startswith("stopped after epoch 1") and first["epochs"] == 1
    resumed = train(cfg, tmp_path / "split", resume=True)
    assert resumed["status"] == "finished"
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_acc", "test_loss", "val_acc", "lr"):
            assert ra[key] == rb[key], (key, ra["epoch"])
    assert full["test_acc_last"] == resumed["test_acc_last"]
    assert full["test_acc_best_val"] == resumed["test_acc_best_val"]
    assert full["channels_last"] is resumed["channels_last"] is True  # CPU default; the checkpoint loads into it


def test_summary_selects_on_validation_not_test(tmp_path):
    summary = train(_cfg(method="ce", noise="sym50"), tmp_path / "run")
    records = _metrics(tmp_path / "run")
    best = max(records, key=lambda r: r["val_acc"])  # first maximum, as the trainer picks
    assert summary["best_val_epoch"] == best["epoch"]
    assert summary["test_acc_best_val"] == best["test_acc"]
    assert summary["test_acc_max"] == max(r["test_acc"] for r in records)
    assert summary["test_acc_last"] == records[-1]["test_acc"]
    assert 0.3 < summary["noise_rate_realized"] < 0.7


def test_no_validation_split_gives_null_best_val(tmp_path):
    summary = train(_cfg(method="ce", val_size=0, epochs=1), tmp_path / "run")
    assert summary["test_acc_best_val"] is None and summary["best_val_epoch"] is None
    assert "val_acc" not in _metrics(tmp_path / "run")[0]


def test_lr_schedule_reaches_the_optimizer(tmp_path):
    train(_cfg(method="ce", epochs=3, lr=0.1, milestones=[1, 2], gamma=0.5), tmp_path / "run")
    assert [r["lr"] for r in _metrics(tmp_path / "run")] == pytest.approx([0.1, 0.05, 0.025])


@pytest.fixture
def exploding_method():
    """A registered method whose loss turns NaN from its 5th step on (epoch 1 has 17 steps)."""

    @register
    class Exploding(Method):
        name = "test-exploding"
        summary = "test only"

        def __init__(self, ctx):
            super().__init__(ctx)
            self.model = self.track("model", ctx.build_model())
            self.steps = 0

        def train_step(self, batch, clean):
            self.steps += 1
            loss = torch.nn.functional.cross_entropy(self.model(batch.x), batch.y).detach()
            return StepOutput(loss=loss if self.steps < 5 + 17 else loss * float("nan"))

        def eval_model(self):
            return self.model

    yield Exploding.name
    del _REGISTRY[Exploding.name]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, exploding_method):
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        train(_cfg(method=exploding_method), run_dir)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1  # epoch 1's checkpoint, untouched by the failed epoch 2
    assert len(_metrics(run_dir)) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("diverged")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt_mod.save_checkpoint(run_dir, {"epoch": 1, "payload": torch.arange(3)})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(run_dir, {"epoch": 2})
    monkeypatch.undo()
    assert ckpt_mod.load_checkpoint(run_dir)["epoch"] == 1
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = _cfg(method="ce", epochs=1)
    train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg, tmp_path / "run")


def test_resume_refuses_changed_settings(tmp_path):
    train(_cfg(method="ce", epochs=1), tmp_path / "run")
    with pytest.raises(ValueError, match="lr"):
        train(_cfg(method="ce", epochs=2, lr=0.3), tmp_path / "run", resume=True)


def _as_if_written_before(run_dir, option):
    """Rewrite a run's config.json and checkpoint as an nrcore without method option `option` wrote them."""
    config = json.loads((run_dir / "config.json").read_text())
    del config["method_options"][option]
    (run_dir / "config.json").write_text(json.dumps(config))
    state = ckpt_mod.load_checkpoint(run_dir)
    del state["config"]["method_options"][option]
    ckpt_mod.save_checkpoint(run_dir, state)


def test_run_from_before_a_new_method_option_still_resumes(tmp_path, capsys):
    """A method option added later (here mwnet's normalize_weights) defaults to the old behaviour:
    a run saved without it resumes through train() and through the CLI (cfg from config.json)."""
    from nrcore.cli import main

    cfg = _cfg(method="mwnet", noise="sym50", epochs=2, method_options={"hypergrad": "autograd"})
    for name in ("api", "cli"):
        train(cfg, tmp_path / name, stop_after_epoch=1)
        _as_if_written_before(tmp_path / name, "normalize_weights")
    assert train(cfg, tmp_path / "api", resume=True)["status"] == "finished"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(tmp_path / "cli"), "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["status"] == "finished"


def test_method_needing_trusted_set_without_one_is_refused(tmp_path):
    needs = [cls for cls in __import__("nrcore.methods", fromlist=["registry"]).registry().values() if cls.needs_clean]
    if not needs:
        pytest.skip("no method needing a trusted set is registered yet")
    cfg = resolve_config(cli={**TINY, "method": needs[0].name, "clean_size": None, "epochs": 1}, cli_method_options={})
    cfg.clean_size = None
    with pytest.raises(ValueError, match="trusted set"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(dataset="mnist", data_dir="{tmp}/empty"), "mnist"),  # no data files
        (dict(clean_size=5000), "trusted set needs"),  # split sizes
        (dict(noise="worst"), "uses the real labels of cifar10n"),  # a noise the dataset cannot provide
        (dict(method="fbr", method_options={"step_size": -1.0}), "--step-size must be >= 0"),  # the method's own check
    ],
)
def test_bad_input_is_refused_before_the_run_directory_is_made(tmp_path, over, message):
    (tmp_path / "empty").mkdir()
    over = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in over.items()}
    cfg = _cfg(**{"method": "ce", "epochs": 1, **over})
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_mid_training_records_why_and_table_says_so(tmp_path, exploding_method, monkeypatch):
    from nrcore.report.table import make_table

    Exploding = _REGISTRY[exploding_method]

    def broken_step(self, batch, clean):
        if self.epoch >= 1:  # the second epoch
            raise RuntimeError("out of memory (simulated)")
        return StepOutput(loss=torch.nn.functional.cross_entropy(self.model(batch.x), batch.y).detach())

    monkeypatch.setattr(Exploding, "start_epoch", lambda self, epoch: setattr(self, "epoch", epoch))
    monkeypatch.setattr(Exploding, "train_step", broken_step)
    run_dir = tmp_path / "runs" / "failing"
    with pytest.raises(RuntimeError, match="simulated"):
        train(_cfg(method=exploding_method), run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed: RuntimeError: out of memory (simulated)"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1 intact
    train(_cfg(method="ce", epochs=1), tmp_path / "runs" / "ok")
    _, notes = make_table([str(tmp_path / "runs")])
    assert any("failing: failed: RuntimeError: out of memory (simulated)" in n for n in notes), notes


def test_an_empty_checkpoint_says_so_and_what_to_do(tmp_path):
    train(_cfg(method="ce", epochs=1), tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint.pt is empty \(0 bytes\).*restore it from a copy, or start over with another --out"):
        train(_cfg(method="ce", epochs=2), tmp_path / "run", resume=True)


def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    positive = torch.rand(60, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auroc(scores, positive) == pytest.approx(float(pairwise), abs=1e-12)
    assert auroc(scores, torch.ones(60, dtype=torch.bool)) is None


@pytest.fixture
def weighted_method():
    """A registered method with per-example weights that drift with every step."""

    @register
    class Drifting(Method):
        name = "test-drifting-weights"
        summary = "test only"

        def __init__(self, ctx):
            super().__init__(ctx)
            self.model = self.track("model", ctx.build_model())
            self.weights = self.track("weights", torch.full((ctx.n_train,), 0.5))

        def train_step(self, batch, clean):
            clean_mask = (batch.y == batch.y_true).float()
            self.weights[batch.index] = (self.weights[batch.index] + 0.05 * (2 * clean_mask - 1)).clamp(0, 1)
            return StepOutput(loss=torch.nn.functional.cross_entropy(self.model(batch.x), batch.y).detach())

        def eval_model(self):
            return self.model

        def example_weights(self):
            return self.weights

    yield Drifting.name
    del _REGISTRY[Drifting.name]


def test_weight_trajectories_and_weight_metrics(tmp_path, weighted_method):
    import numpy as np

    cfg = _cfg(method=weighted_method, noise="sym50", epochs=2, track_examples=50, track_per_epoch=3)
    summary = train(cfg, tmp_path / "run")
    with np.load(tmp_path / "run" / "weights.npz") as data:
        traj, when = data["trajectories"], data["trajectory_epochs"]
        assert traj.shape == (1 + 2 * 3, 50)
        assert when[0] == 0.0 and when[-1] == 2.0 and np.all(np.diff(when) > 0)
        assert np.all(traj[0] == 0.5)
        final, noisy = data["final_weights"], data["is_noisy"]
        np.testing.assert_array_equal(traj[-1], final[data["tracked_index"]])
        np.testing.assert_array_equal(data["tracked_is_noisy"], noisy[data["tracked_index"]])
    records = _metrics(tmp_path / "run")
    assert records[-1]["weight_mean_clean"] > 0.5 > records[-1]["weight_mean_noisy"]
    assert summary["weight_auroc_last"] == pytest.approx(1.0)


def test_selection_ignores_epochs_a_method_excludes(tmp_path, monkeypatch):
    from nrcore.methods.ce import CrossEntropy

    monkeypatch.setattr(CrossEntropy, "counts_for_selection", lambda self, epoch: epoch >= 2)
    summary = train(_cfg(method="ce", noise="sym50", epochs=3), tmp_path / "run")
    records = _metrics(tmp_path / "run")
    assert [r.get("selectable", True) for r in records] == [False, False, True]
    assert summary["best_val_epoch"] == 3 and summary["test_acc_max"] == records[2]["test_acc"]


def test_eval_batch_size_defaults_by_device():
    from nrcore.train import TrainConfig
    from nrcore.train.config import eval_batch_size_for

    assert eval_batch_size_for(TrainConfig(), torch.device("cpu")) == 128  # 1000 is 1.5-2x slower on the CPU
    assert eval_batch_size_for(TrainConfig(), torch.device("cuda", 0)) == 1000
    assert eval_batch_size_for(TrainConfig(eval_batch_size=37), "cpu") == 37
