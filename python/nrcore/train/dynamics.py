"""Per-example signals a run saves for `nrcore audit` (RUN_DIR/audit.npz), gathered during
training at no extra forward:

    aum               area under the margin (Pleiss et al., NeurIPS 2020): the mean over the
                      run's training forwards of logit[given label] - the largest other logit,
                      from the logits a method's step returns (StepOutput.logits); score = -AUM,
                      suggestion = the argmax of the mean predicted distribution
    weight            per-example-weight methods: the final weight; score = 1 - w
    weight_area       ... the area under its weight curve (the mean of the weights at every
                      epoch end, and before training); score = 1 - mean
    final_prediction  the final model's posterior on the training split (eval mode, no
                      augmentation, one pass at the end): score = 1 - p(given label),
                      suggestion = argmax
    <method's own>    Method.audit_signals() (label correction's corrected labels, co-teaching's
                      drop rate, ...)

Accumulators live on the device, are updated without a host sync, and are checkpointed, so a
resumed run saves the same signals as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from nrcore.atomic import atomic_write_bytes
from nrcore.methods.base import ExampleSignal

AUDIT_FILE = "audit.npz"
AUDIT_FORMAT = 1
TRAINER_SIGNALS = ("aum", "weight", "weight_area", "final_prediction")


class TrainingDynamics:
    """The trainer's side of the audit signals, for a training split of `n` examples and `C`
    classes on `device`."""

    def __init__(self, n: int, num_classes: int, device: torch.device):
        self.margin_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(n, num_classes, dtype=torch.float32, device=device)
        self.visits = torch.zeros(n, dtype=torch.int64, device=device)
        self.weight_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.weight_points = 0
        self.first_epoch = 0  # > 0: resumed from a checkpoint made before these signals existed

    def observe_step(self, index: torch.Tensor, labels: torch.Tensor, logits: Optional[torch.Tensor]) -> None:
        if logits is None:
            return
        logits = logits.detach().float()
        given = logits.gather(1, labels[:, None])[:, 0]
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        self.margin_sum.index_add_(0, index, (given - others).double())
        self.prob_sum.index_add_(0, index, logits.softmax(dim=1))
        self.visits.index_add_(0, index, torch.ones_like(index))

    def example_rows(self):
        """The per-example accumulators a step writes at its batch's rows (for torchrun's gather)."""
        return [self.margin_sum, self.prob_sum, self.visits]

    def observe_weights(self, weights: Optional[torch.Tensor]) -> None:
        if weights is not None:
            self.weight_sum += weights.detach().double()
            self.weight_points += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"margin_sum": self.margin_sum, "prob_sum": self.prob_sum, "visits": self.visits,
                "weight_sum": self.weight_sum, "weight_points": self.weight_points, "first_epoch": self.first_epoch}  # fmt: skip

    def load_state_dict(self, state: Optional[Dict[str, Any]], epoch: int) -> None:
        if state is None:  # a checkpoint from before these signals: they start at the resumed epoch
            self.first_epoch = epoch
            return
        for key in ("margin_sum", "prob_sum", "visits", "weight_sum"):
            getattr(self, key).copy_(state[key])
        self.weight_points, self.first_epoch = int(state["weight_points"]), int(state["first_epoch"])

    def signals(self, final_weights: Optional[torch.Tensor]) -> Dict[str, ExampleSignal]:
        out: Dict[str, ExampleSignal] = {}
        if bool((self.visits > 0).any()):
            seen = self.visits.clamp_min(1)
            out["aum"] = ExampleSignal(
                -(self.margin_sum / seen), (self.prob_sum / seen[:, None]).argmax(dim=1),
                "area under the margin of the training forwards (Pleiss et al. 2020); score = -AUM",
            )
        if final_weights is not None:
            out["weight"] = ExampleSignal(1 - final_weights.detach().double(), None, "final per-example weight; score = 1 - w")
            if self.weight_points:
                out["weight_area"] = ExampleSignal(
                    1 - self.weight_sum / self.weight_points, None,
                    f"area under the weight curve (mean of {self.weight_points} epoch-end weights); score = 1 - mean",
                )
        return out


def prediction_signal(probs: torch.Tensor, labels: torch.Tensor) -> ExampleSignal:
    """`final_prediction` from a model's posterior [n, C] on the training split and its labels."""
    probs = probs.double()
    given = probs.gather(1, labels.to(probs.device)[:, None])[:, 0]
    return ExampleSignal(1 - given, probs.argmax(dim=1), "final model's posterior on the training split; score = 1 - p(given label)")


def default_signal(method_default: Optional[str], signals: Dict[str, ExampleSignal]) -> str:
    """The signal the audit ranks by: the method's choice, else the weight area, the AUM, the
    final prediction, in that order of what the run has."""
    for name in (method_default, "weight_area", "aum", "final_prediction"):
        if name is not None and name in signals:
            return name
    raise ValueError(f"no audit signal among {sorted(signals)}")


def write_audit_file(run_dir: Path, signals: Dict[str, ExampleSignal], *, default: str, method: str, first_epoch: int,
                     absent: Dict[str, str], extra: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """RUN_DIR/audit.npz: `{name}__score` (float64 [n]) and, where there is one,
    `{name}__suggestion` (int64 [n]) per signal, and `meta`, a JSON string: format, method,
    default signal, each signal's description, the signals the run lacks and why, and the first
    epoch the training dynamics cover. `extra`: other arrays (a --cv-fold run's `holdout__probs`
    [m, C] and `holdout__source_index` [m], the final model's posterior on its held-out fold)."""
    arrays: Dict[str, np.ndarray] = dict(extra or {})
    described = {}
    for name, signal in signals.items():
        arrays[f"{name}__score"] = signal.score.detach().double().cpu().numpy()
        if signal.suggestion is not None:
            arrays[f"{name}__suggestion"] = signal.suggestion.detach().long().cpu().numpy()
        described[name] = {"description": signal.description, "has_suggestion": signal.suggestion is not None}
    meta = {"format": AUDIT_FORMAT, "method": method, "default": default, "signals": described, "absent": absent,
            "dynamics_first_epoch": first_epoch}  # fmt: skip
    arrays["meta"] = np.array(json.dumps(meta))
    path = Path(run_dir) / AUDIT_FILE
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return path
