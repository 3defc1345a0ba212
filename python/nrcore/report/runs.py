"""Finding and reading run directories (what `nrcore train` writes; see nrcore.train.trainer).

A run directory is any folder holding `config.json` or `summary.json`. Paths given by the user
may be run directories or folders above them (searched recursively). A run counts as finished
when its `summary.json` says `"status": "finished"`; everything else is reported as skipped with
the reason, never silently averaged in.

Runs are grouped into rows of a table (and lines of a figure) by `RowKey`: dataset, noise,
model, and a method label. The label is the method name plus every method option that differs
from the method's registered default, written as its command-line flag (`fbr --no-row-shift`),
so an ablation never merges into the default method's mean. Runs that agree on all of that but
differ in another setting (epochs, lr, trusted-set size...) get that setting appended.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

# Config keys that do not change what a run computes (or are part of the row key already).
NOT_A_SETTING = {
    "seed", "device", "threads", "channels_last", "data_dir", "download", "track_examples", "eval_batch_size",
    "method", "dataset", "noise", "model", "method_options",
}


@dataclass
class Run:
    path: Path
    config: Dict[str, Any]
    summary: Optional[Dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.get("status") == "finished"

    @property
    def status(self) -> str:
        if self.summary is None:
            return "no summary.json (still running, or interrupted: continue with nrcore train --resume)"
        return str(self.summary.get("status", "summary.json has no status"))

    def _get(self, key: str, default: Any = None) -> Any:
        if self.summary is not None and self.summary.get(key) is not None:
            return self.summary[key]
        return self.config.get(key, default)

    @property
    def method(self) -> str:
        return str(self._get("method", "?"))

    @property
    def dataset(self) -> str:
        return str(self._get("dataset", "?"))

    @property
    def noise(self) -> str:
        return str(self._get("noise", "?"))

    @property
    def model(self) -> str:
        return str(self._get("model", "?"))

    @property
    def seed(self) -> int:
        return int(self._get("seed", 0))

    @property
    def method_options(self) -> Dict[str, Any]:
        return dict(self.config.get("method_options") or {})

    @property
    def settings(self) -> Tuple[Tuple[str, str], ...]:
        """The config keys that change results, other than the row key (hashable)."""
        return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in self.config.items() if k not in NOT_A_SETTING))

    @property
    def identity(self) -> Tuple:
        """What fixes a run's numbers: row key fields, method options, settings and seed."""
        options = json.dumps(self.method_options, sort_keys=True)
        return (self.dataset, self.noise, self.model, self.method, options, self.settings, self.seed)

    @cached_property
    def metrics(self) -> List[Dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def result_metrics(self) -> Tuple[List[Dict[str, Any]], int]:
        """(the epochs that are the method's result, how many epochs came before them).

        Phased methods (glc, forward with an estimated matrix) first train a plain model on the
        noisy labels; their records carry `phase` and only the last phase is their result."""
        phases = [m["phase"] for m in self.metrics if m.get("phase") is not None]
        if not phases:
            return self.metrics, 0
        last = [m for m in self.metrics if m.get("phase") == max(phases)]
        return last, (last[0]["epoch"] - 1 if last else 0)

    @property
    def test_acc_best_val(self) -> Optional[float]:
        """Test accuracy at the best clean-validation epoch of the result epochs (the trainer's
        summary picks over all epochs, which for phased methods can be a phase-1 epoch)."""
        records, offset = self.result_metrics
        if offset == 0:
            return (self.summary or {}).get("test_acc_best_val")
        best = None
        for m in records:  # first maximum, as the trainer picks it
            if m.get("val_acc") is not None and (best is None or m["val_acc"] > best["val_acc"]):
                best = m
        return best["test_acc"] if best else None

    @property
    def best_val_epoch(self) -> Optional[int]:
        """The epoch of `test_acc_best_val`, counted inside the result epochs."""
        records, offset = self.result_metrics
        if offset == 0:
            return (self.summary or {}).get("best_val_epoch")
        with_val = [m for m in records if m.get("val_acc") is not None]
        return max(with_val, key=lambda m: m["val_acc"])["epoch"] - offset if with_val else None

    @property
    def weights_file(self) -> Optional[Path]:
        path = self.path / "weights.npz"
        return path if path.is_file() else None

    @property
    def label_correction_file(self) -> Optional[Path]:
        path = self.path / "label_correction.npz"
        return path if path.is_file() else None

    @property
    def train_label_files(self) -> Optional[Tuple[Path, Path]]:
        """(labels the run trained on, original labels) of the training split, as saved under
        labels/ (nrcore.data.task.save_task_labels), or None."""
        given, true = self.path / "labels" / "train_labels.npy", self.path / "labels" / "train_true_labels.npy"
        return (given, true) if given.is_file() and true.is_file() else None


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def load_run(path: Path) -> Run:
    summary = _read_json(path / "summary.json")
    config = _read_json(path / "config.json") or (summary or {}).get("config") or {}
    return Run(path=path, config=config, summary=summary)


def _is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "config.json").is_file()


def find_runs(paths: Iterable[str | Path]) -> List[Run]:
    """Every run directory at or below `paths` (each listed once, in path order)."""
    found: Dict[Path, None] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ValueError(f"no such run directory or folder: {str(root)!r}")
        if root.is_file():
            raise ValueError(f"{str(root)!r} is a file; give run directories or folders holding them")
        if _is_run_dir(root):
            found[root.resolve()] = None
            continue
        for marker in sorted(root.rglob("*.json")):
            if marker.name in ("summary.json", "config.json"):
                found[marker.parent.resolve()] = None
    if not found:
        raise ValueError(f"no run directories (folders with config.json or summary.json) under {', '.join(map(str, paths))}")
    # a run's own subfolders never hold runs; drop anything nested inside another run
    runs = sorted(found)
    runs = [p for p in runs if not any(q != p and q in p.parents for q in runs)]
    return [load_run(p) for p in runs]


def split_finished(runs: List[Run]) -> Tuple[List[Run], List[str]]:
    """(finished runs, one note per skipped run). A finished run that repeats another's
    settings and seed (a copied run directory, or the same grid cell run twice) computes the
    same numbers, so it would pose as a second seed: it counts once, the first by path, and a
    note says which was used."""
    done: Dict[Tuple, Run] = {}
    notes = [f"skipped {r.path}: {r.status}" for r in runs if not r.finished]
    for run in runs:
        if not run.finished:
            continue
        first = done.setdefault(run.identity, run)
        if first is not run:
            notes.append(f"skipped {run.path}: the same run as {first.path} (same settings, seed {run.seed}); counted once, using {first.path}")
    return list(done.values()), notes


# ---- grouping -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RowKey:
    dataset: str
    noise: str
    model: str
    label: str  # method plus non-default options (and distinguishing settings)
    method: str = field(compare=False, default="")


def _option_defaults() -> Dict[str, Dict[str, Any]]:
    """{method: {option: default}} from the registry (empty when it cannot be imported)."""
    try:
        from nrcore.methods import registry

        return {name: {o.name: o.default for o in cls.options} for name, cls in registry().items()}
    except Exception:  # reading old runs must not depend on every method importing cleanly
        return {}


def _flag(name: str, value: Any) -> str:
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def method_label(run: Run, defaults: Dict[str, Dict[str, Any]]) -> str:
    own = defaults.get(run.method)
    options = run.method_options
    # a method this install does not know: every option it ran with (its defaults are unknown)
    changed = [_flag(k, v) for k, v in sorted(options.items()) if own is None or (k in own and not _same(v, own[k]))]
    return " ".join([run.method] + changed)


def group_runs(runs: List[Run]) -> Dict[RowKey, List[Run]]:
    """Runs grouped into table rows, ordered by dataset, noise, model, then `ce` first."""
    defaults = _option_defaults()
    first: Dict[Tuple, List[Run]] = {}
    for run in runs:
        key = (run.dataset, run.noise, run.model, method_label(run, defaults), run.method)
        first.setdefault(key, []).append(run)

    groups: Dict[RowKey, List[Run]] = {}
    for (dataset, noise, model, label, method), members in first.items():
        by_settings: Dict[Tuple, List[Run]] = {}
        for run in members:
            by_settings.setdefault(run.settings, []).append(run)
        if len(by_settings) == 1:
            groups[RowKey(dataset, noise, model, label, method)] = members
            continue
        # the same method row run with different settings: keep apart and say how they differ
        dicts = [dict(s) for s in by_settings]
        varying = sorted(k for k in set().union(*dicts) if len({d.get(k) for d in dicts}) > 1)
        for settings, rows in by_settings.items():
            values = dict(settings)
            extra = " ".join(f"{k}={json.loads(values[k]) if k in values else 'unset'}" for k in varying)
            groups[RowKey(dataset, noise, model, f"{label} [{extra}]", method)] = rows
    order = sorted(groups, key=lambda k: (k.dataset, _noise_order(k.noise), k.model, k.method != "ce", k.label))
    return {k: sorted(groups[k], key=lambda r: (r.seed, str(r.path))) for k in order}


def _noise_order(noise: str) -> Tuple:
    """clean first, then by family and rate (sym20 < sym80 < unif40 ...), numerically."""
    head = noise.rstrip("0123456789")
    tail = noise[len(head):]
    return (noise != "clean", head, int(tail) if tail else -1)
