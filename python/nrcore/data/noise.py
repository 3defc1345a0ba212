"""Noise models: `NoiseSpec` ("sym80", "asym40", "aggre", ...), their transition matrices, and
seeded sampling of noisy labels. The table of models is in `docs/data.md` and
`docs/method-contract.md` ("Noise")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from nrcore.data.splits import seeded_generator

SYNTHETIC_KINDS = ("sym", "unif", "asym", "pair", "flip")

# Real-label specs: name -> (datasets that carry these labels, key in the released label file).
REAL_LABEL_SPECS = {
    "aggre": (("cifar10n", "cifar10n-cpu"), "aggre_label"),
    "random1": (("cifar10n", "cifar10n-cpu"), "random_label1"),
    "random2": (("cifar10n", "cifar10n-cpu"), "random_label2"),
    "random3": (("cifar10n", "cifar10n-cpu"), "random_label3"),
    "worst": (("cifar10n", "cifar10n-cpu"), "worse_label"),
    "noisy100": (("cifar100n",), "noisy_label"),
    "real": (("clothing1m", "custom"), "real"),
}

# CIFAR-10 "asym" (FBR paper, after Patrini et al.): truck->automobile, bird->airplane,
# deer->horse, cat<->dog. Class ids in the official order.
CIFAR10_ASYM_TARGETS = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

VALID_FORMS = (
    "clean; symR, unifR, asymR, pairR, flipR with R the noise percent 0-100 (e.g. sym80, asym40, pair45, unif12.5; "
    "a percent below 1 is written with %, e.g. sym0.5%); "
    "real CIFAR-10N labels: aggre, random1, random2, random3, worst; CIFAR-100N: noisy100; "
    "the dataset's own labels (clothing1m, custom): real"
)

_SYNTHETIC_RE = re.compile(r"^(sym|unif|asym|pair|flip)(\d+(?:\.\d+)?)(%?)$")


@dataclass(frozen=True)
class NoiseSpec:
    """A noise model. `kind` is "clean", one of `SYNTHETIC_KINDS` (with `percent`), or a
    real-label name (`REAL_LABEL_SPECS`). `str(spec)` gives the canonical spec string, and
    `NoiseSpec.parse(str(spec)) == spec`."""

    kind: str
    percent: Optional[float] = None

    def __post_init__(self):
        if self.kind in SYNTHETIC_KINDS:
            if self.percent is None or not 0.0 <= float(self.percent) <= 100.0:
                raise ValueError(f"noise {self.kind}R needs a percent R in [0, 100], got {self.percent!r}; valid: {VALID_FORMS}")
            object.__setattr__(self, "percent", float(self.percent))
        elif self.kind == "clean" or self.kind in REAL_LABEL_SPECS:
            if self.percent is not None:
                raise ValueError(f"noise {self.kind!r} takes no percent; valid: {VALID_FORMS}")
        else:
            raise ValueError(f"unknown noise kind {self.kind!r}; valid: {VALID_FORMS}")

    @classmethod
    def parse(cls, spec: "str | NoiseSpec") -> "NoiseSpec":
        if isinstance(spec, NoiseSpec):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"noise spec must be a string like 'sym80', got {type(spec).__name__}; valid: {VALID_FORMS}")
        text = spec.strip().lower()
        if text == "clean" or text in REAL_LABEL_SPECS:
            return cls(text)
        match = _SYNTHETIC_RE.match(text)
        if match is None:
            raise ValueError(f"malformed noise spec {spec!r}; valid: {VALID_FORMS}")
        kind, percent, explicit = match.group(1), float(match.group(2)), match.group(3)
        if 0 < percent < 1 and not explicit:  # almost always a rate written for a percent
            raise ValueError(
                f"noise {spec!r}: R is a percent, so this would be {percent:g}% noise; for {100 * percent:g}% write "
                f"{kind}{100 * percent:g} (for {percent:g}% write {kind}{percent:g}%)"
            )
        return cls(kind, percent)

    def __str__(self) -> str:
        if self.percent is None:
            return self.kind
        below_one = "%" if 0 < self.percent < 1 else ""  # sym0.5%: see parse
        return self.kind + np.format_float_positional(self.percent, trim="-") + below_one  # shortest exact: 80, 12.5

    @property
    def rate(self) -> Optional[float]:
        """The nominal rate r = R/100 (0 for clean, None for real labels)."""
        if self.kind == "clean":
            return 0.0
        return None if self.percent is None else self.percent / 100.0

    @property
    def is_real(self) -> bool:
        return self.kind in REAL_LABEL_SPECS

    @property
    def is_synthetic(self) -> bool:
        return self.kind in SYNTHETIC_KINDS

    def resolved_kind(self, dataset: Optional[str]) -> str:
        """`asym` means a class map on CIFAR-10/100 and `pair` elsewhere (docs/method-contract.md, "Noise")."""
        if self.kind == "asym" and dataset not in ("cifar10", "cifar100"):
            return "pair"
        return self.kind

    def describe(self, num_classes: int, dataset: Optional[str] = None) -> str:
        """One line for the run summary."""
        if self.kind == "clean":
            return "clean: no label noise"
        if self.is_real:
            return f"{self.kind}: real noisy labels shipped with the dataset"
        r = self.percent
        kind = self.resolved_kind(dataset)
        if kind == "sym":
            return f"sym{r:g}: with prob. {r:g}% a uniformly random other class"
        if kind == "unif":
            return f"unif{r:g}: with prob. {r:g}% a uniformly random class (may be the true one)"
        if kind == "pair":
            prefix = f"asym{r:g} on {dataset} = " if self.kind == "asym" else ""
            return f"{prefix}pair{r:g}: class c -> c+1 mod {num_classes} with prob. {r:g}%"
        if kind == "flip":
            return f"flip{r:g}: each class -> one fixed random other class (seeded) with prob. {r:g}%"
        if dataset == "cifar10":
            return f"asym{r:g}: truck->automobile, bird->airplane, deer->horse, cat<->dog with prob. {r:g}%"
        return f"asym{r:g}: next fine class inside its CIFAR-100 super-class (real coarse labels) with prob. {r:g}%"

    def transition_matrix(
        self,
        num_classes: int,
        *,
        dataset: Optional[str] = None,
        coarse_of_class: Optional[Sequence[int]] = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """T [C, C] float64, T[c, c'] = P(noisy c' | true c).

        dataset:          decides what `asym` means (cifar10, cifar100; `pair` elsewhere)
        coarse_of_class:  CIFAR-100 `asym`: the super-class of each fine class (from the real
                          coarse labels)
        seed:             `flip`: the run seed, which fixes each class's flip target
        """
        C = int(num_classes)
        if C < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if self.is_real:
            raise ValueError(f"noise {self} uses real labels and has no nominal transition matrix (the Task carries the empirical one)")
        eye = torch.eye(C, dtype=torch.float64)
        if self.kind == "clean":
            return eye
        r = self.percent / 100.0
        kind = self.resolved_kind(dataset)
        if kind == "sym":
            return (1 - r) * eye + r / (C - 1) * (1 - eye)
        if kind == "unif":
            return (1 - r) * eye + r / C
        if kind == "pair":
            targets = {c: (c + 1) % C for c in range(C)}
        elif kind == "flip":
            targets = dict(enumerate(flip_targets(C, seed)))
        elif dataset == "cifar10":
            if C != 10:
                raise ValueError(f"CIFAR-10 asym noise needs 10 classes, got {C}")
            targets = CIFAR10_ASYM_TARGETS
        else:
            targets = cifar100_asym_targets(coarse_of_class, C)
        T = eye.clone()
        for source, target in targets.items():
            T[source, source] = 1 - r
            T[source, target] += r
        return T


def flip_targets(num_classes: int, seed: int) -> list:
    """`flip`: for each class one other class, drawn uniformly with a generator seeded by the run seed."""
    g = seeded_generator(seed, "flip-targets")
    draws = torch.randint(0, num_classes - 1, (num_classes,), generator=g).tolist()
    return [d + 1 if d >= c else d for c, d in enumerate(draws)]


def cifar100_asym_targets(coarse_of_class: Optional[Sequence[int]], num_classes: int) -> dict:
    """Each fine class -> the next fine class (by id, cyclically) of its real super-class."""
    if coarse_of_class is None:
        raise ValueError("CIFAR-100 asym noise needs coarse_of_class (the super-class of each fine class)")
    coarse = np.asarray(coarse_of_class, dtype=np.int64)
    if coarse.shape != (num_classes,):
        raise ValueError(f"coarse_of_class must have {num_classes} entries, got {coarse.shape}")
    targets = {}
    for group in np.unique(coarse):
        members = np.flatnonzero(coarse == group)
        for i, c in enumerate(members):
            targets[int(c)] = int(members[(i + 1) % len(members)])
    return targets


def sample_noisy_labels(true_labels: np.ndarray, T: torch.Tensor, generator: torch.Generator) -> np.ndarray:
    """Draw one noisy label per example from row T[true] (inverse-CDF with one uniform each,
    so example i's label depends only on the generator and i)."""
    true = torch.as_tensor(true_labels, dtype=torch.int64)
    u = torch.rand(len(true), generator=generator, dtype=torch.float64)
    cdf = T.cumsum(1)[true]  # [N, C]
    noisy = (u[:, None] >= cdf).sum(1).clamp_(max=T.shape[0] - 1)  # zero-probability classes are never chosen
    return noisy.numpy().astype(np.int64)


def empirical_transition(true_labels: np.ndarray, noisy_labels: np.ndarray, num_classes: int) -> Optional[torch.Tensor]:
    """Row-normalised confusion of (true, noisy) over examples whose true label is known (>= 0);
    rows of classes without such examples are NaN; None when no true label is known."""
    known = true_labels >= 0
    if not known.any():
        return None
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (true_labels[known], noisy_labels[known]), 1.0)
    rows = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return torch.from_numpy(counts / rows)


def expected_noise_rate(T: torch.Tensor, true_labels: np.ndarray) -> float:
    """The fraction of labels a model T is expected to change on these true labels."""
    counts = np.bincount(true_labels, minlength=T.shape[0]).astype(np.float64)
    return float((counts * (1.0 - T.diagonal().numpy())).sum() / max(counts.sum(), 1.0))
