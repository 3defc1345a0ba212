"""Reading a finished run's per-example signals (RUN_DIR/audit.npz, written by the trainer: see
nrcore.train.dynamics) and turning one of them into a ranked list of suspect labels, detection
metrics against the true labels when the run knows them, and a corrected label file.

Nothing here trains or runs a model: the audit reads only the run directory.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nrcore.report.runs import load_run
from nrcore.train.dynamics import AUDIT_FILE, AUDIT_FORMAT

CSV_COLUMNS = ("index", "given_label", "suggested_label", "score", "source", "source_index")


class AuditError(ValueError):
    """A run directory the audit cannot read: one line saying why and what to do."""


@dataclass
class Signal:
    name: str
    score: np.ndarray  # float64 [n], higher = more likely mislabelled
    suggestion: Optional[np.ndarray]  # int64 [n] or None
    description: str


@dataclass
class RunAudit:
    """A run's signals and labels. `given` are the training labels the run used (labels/), `true`
    the original ones (-1 where unknown), `trusted_rows` the training rows that are trusted
    examples (with --use-clean-in-train: never changed by an export)."""

    run_dir: Path
    method: str
    signals: Dict[str, Signal]
    default: str
    absent: Dict[str, str]
    given: np.ndarray
    true: np.ndarray
    source_index: np.ndarray
    num_classes: int
    trusted_rows: np.ndarray
    val_acc_last: Optional[float]
    notes: List[str] = field(default_factory=list)

    @property
    def knows_truth(self) -> bool:
        """Whether every training example has a known original label (synthetic noise, CIFAR-N)."""
        return bool(len(self.true)) and bool((self.true >= 0).all())

    def signal(self, name: Optional[str] = None) -> Signal:
        name = name or self.default
        if name not in self.signals:
            why = f" ({self.absent[name]})" if name in self.absent else ""
            raise AuditError(f"{self.run_dir}: the run has no signal {name!r}{why}; it has: {', '.join(sorted(self.signals))}")
        return self.signals[name]

    def suggestions(self, signal: Signal) -> np.ndarray:
        """The signal's suggested labels; for a signal without them (weights, drop rates), the
        final model's prediction; -1 where the run has neither (a run from before audit.npz)."""
        if signal.suggestion is not None:
            return signal.suggestion
        if "final_prediction" in self.signals:
            return self.signals["final_prediction"].suggestion
        return np.full(len(self.given), -1, dtype=np.int64)

    def ranking(self, name: Optional[str] = None) -> np.ndarray:
        """Training rows, most suspect first (ties: lower row first)."""
        score = self.signal(name).score
        return np.lexsort((np.arange(len(score)), -score))

    def rows(self, name: Optional[str] = None, top: Optional[int] = None) -> List[dict]:
        """One dict per training example (the CSV columns), most suspect first."""
        signal = self.signal(name)
        suggested = self.suggestions(signal)
        order = self.ranking(name)[: top if top is not None else None]
        return [
            {"index": int(i), "given_label": int(self.given[i]), "suggested_label": int(suggested[i]),
             "score": float(signal.score[i]), "source": signal.name, "source_index": int(self.source_index[i])}
            for i in order
        ]  # fmt: skip

    # ---- how many to flag: the noise rate, estimated without the true labels -------------------------
    def estimated_noise_rate(self) -> float:
        """The training labels' noise rate estimated from the final model: its disagreement D with
        the training labels, corrected for its own error E on the clean validation split. If the
        model errs at rate E, uniformly over the other classes and independently of the label
        noise, D = E + ρ (1 - E C/(C-1)), so ρ = (D - E) / (1 - E C/(C-1)), clipped to [0, 1].
        Uses the validation labels (clean) and the training labels, never the true ones. A model
        that has memorised its labels disagrees with few of them, so this errs low: the export
        then changes fewer labels."""
        if "final_prediction" not in self.signals:
            raise AuditError(f"{self.run_dir}: the run saved no final predictions (no audit.npz), which the flag count is estimated from")
        if self.val_acc_last is None:
            raise AuditError(f"{self.run_dir}: the run has no clean validation split, which the threshold is chosen on (train with --val-size)")
        rows = np.setdiff1d(np.arange(len(self.given)), self.trusted_rows)
        D = float((self.signals["final_prediction"].suggestion[rows] != self.given[rows]).mean())
        E = 1.0 - self.val_acc_last / 100.0
        C = self.num_classes
        denominator = 1.0 - E * C / (C - 1)
        if denominator <= 0:  # the model is no better than chance on clean data: it cannot tell
            return 0.0
        return float(min(max((D - E) / denominator, 0.0), 1.0))

    def flag_count(self) -> int:
        return int(round(self.estimated_noise_rate() * (len(self.given) - len(self.trusted_rows))))

    def exported_labels(self, name: Optional[str] = None) -> tuple:
        """(the training labels with the suggested label for the flagged examples, how many
        changed, how many flagged): the `flag_count()` most suspect non-trusted examples, changed
        where the suggestion differs from the given label."""
        signal = self.signal(name)
        suggested = self.suggestions(signal)
        if (suggested < 0).any():
            raise AuditError(f"{self.run_dir}: the run saved no suggested labels (no audit.npz); re-run it to export labels")
        trusted = np.zeros(len(self.given), dtype=bool)
        trusted[self.trusted_rows] = True
        order = [i for i in self.ranking(name) if not trusted[i]]
        flagged = np.asarray(order[: self.flag_count()], dtype=np.int64)
        labels = self.given.copy()
        labels[flagged] = suggested[flagged]
        return labels, int((labels != self.given).sum()), len(flagged)

    # ---- against the truth ----------------------------------------------------------------------
    def detection(self, name: Optional[str] = None, flagged: Optional[int] = None) -> Dict[str, float]:
        """AUROC and average precision of the score for finding mislabelled examples, precision and
        recall of its top `flagged` (default: the audit's own flag count), and of its top as many as
        there are mislabelled examples. Needs the true labels (analysis only)."""
        if not self.knows_truth:
            raise AuditError(f"{self.run_dir}: the true labels of the training examples are unknown")
        score = self.signal(name).score
        noisy = self.given != self.true
        order = self.ranking(name)
        k = self.flag_count() if flagged is None else int(flagged)
        n_noisy = int(noisy.sum())
        out = {"auroc": auroc(score, noisy), "average_precision": average_precision(score, noisy), "mislabelled": n_noisy,
               "examples": len(score), "flagged": k}  # fmt: skip
        for key, top in (("at_flagged", k), ("at_mislabelled", n_noisy)):
            hits = int(noisy[order[:top]].sum())
            out[f"precision_{key}"] = hits / top if top else math.nan
            out[f"recall_{key}"] = hits / n_noisy if n_noisy else math.nan
        return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """nrcore.train.metrics.auroc (ties count one half) on numpy arrays; NaN when a class is empty."""
    import torch

    from nrcore.train.metrics import auroc as torch_auroc

    value = torch_auroc(torch.from_numpy(np.asarray(score, dtype=np.float64)), torch.from_numpy(positive.astype(bool)))
    return math.nan if value is None else value


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """Σ_k (R_k - R_{k-1}) P_k over the ranking by score (the step-wise area under the
    precision-recall curve, as scikit-learn's average_precision_score); tied scores are one
    threshold. NaN without positives."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(p)[last_of_tie]
    seen = (np.arange(len(s)) + 1)[last_of_tie]
    precision = tp / seen
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_step * precision).sum())


def precision_recall_curve(score: np.ndarray, positive: np.ndarray) -> tuple:
    """(recall, precision) at every distinct threshold, highest score first (for figures)."""
    positive = positive.astype(bool)
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(p)[last_of_tie]
    seen = (np.arange(len(s)) + 1)[last_of_tie]
    return tp / max(int(positive.sum()), 1), tp / seen


# ---- reading a run ---------------------------------------------------------------------------------
def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AuditError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); the file is damaged: re-run the training to rewrite it") from None


def _signals_from_audit_file(path: Path) -> tuple:
    arrays = _load_npz(path)
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, json.JSONDecodeError):
        raise AuditError(f"{path}: no readable 'meta' entry; the file is damaged: re-run the training to rewrite it") from None
    if meta.get("format") != AUDIT_FORMAT:
        raise AuditError(f"{path}: audit file format {meta.get('format')!r}, this nrcore reads {AUDIT_FORMAT}")
    signals = {}
    for name, info in meta["signals"].items():
        if f"{name}__score" not in arrays:
            raise AuditError(f"{path}: signal {name!r} has no scores; the file is damaged: re-run the training to rewrite it")
        signals[name] = Signal(name, arrays[f"{name}__score"].astype(np.float64), arrays.get(f"{name}__suggestion"), info["description"])
    return signals, meta


def _signals_from_weights_file(path: Path) -> Dict[str, Signal]:
    """A run made before audit.npz existed: its final weights, if it kept any."""
    arrays = _load_npz(path)
    if "final_weights" not in arrays:
        raise AuditError(f"{path}: no 'final_weights' entry; the file is damaged: re-run the training to rewrite it")
    return {"weight": Signal("weight", 1.0 - arrays["final_weights"].astype(np.float64), None, "final per-example weight (weights.npz); score = 1 - w")}


def load_audit(run_dir) -> RunAudit:
    """A finished run's signals and labels; an AuditError (one line) for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir}: no such run directory")
    if not (run_dir / "config.json").is_file() and not (run_dir / "summary.json").is_file():
        raise AuditError(f"{run_dir}: not a run directory (no config.json or summary.json; `nrcore train --out` makes one)")
    run = load_run(run_dir)
    if not run.finished:
        raise AuditError(f"{run_dir}: the run is not finished ({run.status}); audit a finished run")
    labels_dir = run_dir / "labels"
    try:
        given = np.load(labels_dir / "train_labels.npy", allow_pickle=False)
        true = np.load(labels_dir / "train_true_labels.npy", allow_pickle=False)
        source_index = np.load(labels_dir / "train_source_index.npy", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AuditError(f"{run_dir}: cannot read its training labels under labels/ ({exc})") from None
    summary = run.summary or {}
    task = summary.get("task") or {}
    sizes = task.get("sizes") or {}
    n = len(given)
    trusted_rows = np.arange(n - int(sizes.get("clean", 0)), n) if task.get("use_clean_in_train") else np.zeros(0, dtype=np.int64)
    notes = []
    if (run_dir / AUDIT_FILE).is_file():
        signals, meta = _signals_from_audit_file(run_dir / AUDIT_FILE)
        default, absent = meta["default"], dict(meta.get("absent", {}))
        if meta.get("dynamics_first_epoch"):
            notes.append(f"the training dynamics cover epochs {meta['dynamics_first_epoch'] + 1} on only (resumed from an older checkpoint)")
    elif (run_dir / "weights.npz").is_file():
        signals, default, absent = _signals_from_weights_file(run_dir / "weights.npz"), "weight", {}
        notes.append("no audit.npz (a run from before nrcore saved audit signals): only its final weights; suggestions need audit.npz")
    else:
        raise AuditError(
            f"{run_dir}: the run saved no per-example signal (no audit.npz: it was made before nrcore saved them, "
            f"and method {run.method!r} keeps no weights.npz); re-run it to audit it"
        )
    for name, signal in signals.items():
        if len(signal.score) != n:
            raise AuditError(f"{run_dir}: signal {name!r} has {len(signal.score)} scores but the run has {n} training examples")
    return RunAudit(
        run_dir=run_dir, method=run.method, signals=signals, default=default, absent=absent, given=given, true=true,
        source_index=source_index, num_classes=int(task.get("num_classes") or (max(given.max(), true.max()) + 1)),
        trusted_rows=trusted_rows, val_acc_last=summary.get("val_acc_last"), notes=notes,
    )  # fmt: skip


def score_run(run_dir, signal: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The audit of one finished run as numpy arrays over its training examples, most suspect
    first: `index` (row in the run's training split, as in labels/), `given_label`,
    `suggested_label`, `score`, `source_index`, and `true_label` (-1 where unknown; analysis
    only). `signal`: which of the run's signals (default: the method's; see `load_audit(run_dir).signals`)."""
    audit = load_audit(run_dir)
    chosen = audit.signal(signal)
    order = audit.ranking(chosen.name)
    return {
        "index": order, "given_label": audit.given[order], "suggested_label": audit.suggestions(chosen)[order],
        "score": chosen.score[order], "source_index": audit.source_index[order], "true_label": audit.true[order],
        "source": np.array(chosen.name),
    }  # fmt: skip
