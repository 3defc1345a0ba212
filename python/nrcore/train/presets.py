"""Named settings (`--preset NAME`), gathered from the methods that declare them.

A method's `presets` dict maps a name (e.g. "ebomlc-cifar10") to config keys: train fields
(dataset, model, epochs, lr, milestones, clean_frac, ...) and the method's own options. The
preset also selects its method.
"""

from __future__ import annotations

from typing import Any, Dict


def all_presets() -> Dict[str, Dict[str, Any]]:
    from nrcore.methods import registry

    out: Dict[str, Dict[str, Any]] = {}
    for name, cls in registry().items():
        for preset, values in cls.presets.items():
            if preset in out:
                raise ValueError(f"preset {preset!r} declared by two methods")
            out[preset] = {"method": name, **values}
    return dict(sorted(out.items()))
