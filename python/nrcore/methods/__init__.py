"""Training methods, one module per method; what the methods of a family share lives in
`families/`. Every method module in this package is imported here so that its `@register`ed
class appears in the registry (no list to keep in sync)."""

import importlib
import pkgutil

from nrcore.methods.base import (  # noqa: F401
    ExampleSignal,
    Method,
    MethodContext,
    OptimConfig,
    Option,
    SingleModelMethod,
    StepOutput,
    get_method,
    register,
    registry,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.ispkg and not _info.name.startswith("_") and _info.name != "base":  # families/: shared parts
        importlib.import_module(f"{__name__}.{_info.name}")
