"""The run checkpoint: written atomically (nrcore.atomic), read with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from nrcore.atomic import atomic_write_bytes

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


def save_checkpoint(run_dir: Path, state: Dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT
    state = {"format": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: {str(run_dir)!r} has no {CHECKPOINT} (nothing finished an epoch there yet)")
    fix = f"restore it from a copy, or start over with another --out (or after deleting {run_dir})"
    if path.stat().st_size == 0:
        raise ValueError(f"--resume: {path} is empty (0 bytes), so there is nothing to resume from; "
                         f"nrcore writes it atomically, so it was truncated or replaced by something else: {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {exc}" if str(exc) else f"{exc.__class__.__name__} (the file is truncated or not a checkpoint)"
        raise ValueError(f"--resume: cannot read {path}: {reason}; {fix}") from None
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state
