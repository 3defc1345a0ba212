"""Training methods, one module per method. Every module in this package is imported here so
that its `@register`ed class appears in the registry (no list to keep in sync)."""

import importlib
import pkgutil

from nrcore.methods.base import (  # noqa: F401
    Method,
    MethodContext,
    OptimConfig,
    Option,
    StepOutput,
    get_method,
    register,
    registry,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")
