"""Method variants for the bench scripts: `method` or `method:option=value,option=value`.

A list of variants is comma-separated too (`ce,meta:hypergrad=tangent,fbr:center=false`); an item
with `=` but no `:` continues the previous variant's options (`meta:hypergrad=jvp,beta=0.3`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple


def split_variants(text: str) -> List[str]:
    """Split a comma-separated list of variants without breaking multi-option variants apart."""
    items: List[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part and ":" not in part and items:
            items[-1] += "," + part
        else:
            items.append(part)
    return items


@dataclass(frozen=True)
class Variant:
    """A method and the options that differ from its defaults."""

    method: str
    options: Tuple[Tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """Folder name: fbr, fbr_no-center, bootstrap_bootstrap-mode-hard ..."""
        parts = [self.method]
        for key, value in self.options:
            flag = key.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else f"no-{flag}")
            else:
                parts.append(f"{flag}-{value}")
        return "_".join(parts)


def parse_variant(text: str, registry: Dict[str, type]) -> Variant:
    """`method` or `method:opt=value,opt=value`, values typed by the method's Option."""
    method, _, rest = text.partition(":")
    method = method.strip()
    if method not in registry:
        return Variant(method, ())  # caller warns and skips it
    options = {o.name: o for o in registry[method].options}
    parsed = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in options:
            known = ", ".join(options) or "none"
            raise SystemExit(f"error: {text!r}: expected option=value with an option of {method} ({known})")
        parsed.append((key, _typed(options[key], raw.strip(), text)))
    return Variant(method, tuple(sorted(parsed)))


def _typed(option, raw: str, where: str) -> Any:
    if option.type is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"error: {where!r}: {option.name} is true or false, got {raw!r}")
    if isinstance(option.type, tuple):
        if raw not in option.type:
            raise SystemExit(f"error: {where!r}: {option.name} is one of {', '.join(option.type)}, got {raw!r}")
        return raw
    try:
        return option.type(raw)
    except ValueError:
        raise SystemExit(f"error: {where!r}: {option.name} needs a {option.type.__name__}, got {raw!r}") from None
