"""Atomic checkpoint and JSON writes: a crash mid-write never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(fileobj)` to a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def save_checkpoint(run_dir: Path, state: Dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT
    state = {"format": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"--resume: {str(run_dir)!r} has no {CHECKPOINT} (nothing finished an epoch there yet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--resume: cannot read {path}: {exc.__class__.__name__}: {exc}") from None
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    return state
