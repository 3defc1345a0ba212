"""Named settings (`--preset NAME`), gathered from the methods that declare them.

A method's `presets` dict maps a name (e.g. "ebomlc-cifar10") to config keys: train fields
(dataset, model, epochs, lr, milestones, clean_frac, ...) and the method's own options. The
preset also selects its method.

Dataset presets (`DATASET_PRESETS`) select no method: `--preset cifar10n-cpu --method fbr` is
the CPU protocol's dataset with its defaults, the same as `--dataset cifar10n-cpu`, spelled out
so that `nrcore presets` shows what the protocol is.
"""

from __future__ import annotations

from typing import Any, Dict


DATASET_PRESETS = ("cifar10n-cpu",)


def all_presets() -> Dict[str, Dict[str, Any]]:
    from nrcore.methods import registry
    from nrcore.train.config import DATASET_DEFAULTS

    out: Dict[str, Dict[str, Any]] = {name: {"dataset": name, **DATASET_DEFAULTS[name]} for name in DATASET_PRESETS}
    for name, cls in registry().items():
        for preset, values in cls.presets.items():
            if preset in out:
                raise ValueError(f"preset {preset!r} declared by two methods")
            out[preset] = {"method": name, **values}
    return dict(sorted(out.items()))
