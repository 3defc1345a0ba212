"""Progress output: a live bar per epoch on a terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """`mode`: "bar" (redrawn in place, for terminals), "lines" (one line per epoch, for logs and
    pipes) or "quiet" (nothing). "auto" picks "bar" when the stream is a terminal."""

    def __init__(self, mode: str = "auto", stream: Optional[TextIO] = None, min_interval: float = 0.25):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode not in ("bar", "lines", "quiet"):
            raise ValueError(f"progress mode must be auto, bar, lines or quiet, got {mode!r}")
        self.mode = mode
        self.min_interval = min_interval
        self._last_draw = 0.0

    @property
    def wants_updates(self) -> bool:
        """Whether per-step updates are shown (each one costs a host sync to read the loss)."""
        return self.mode == "bar"

    def message(self, text: str) -> None:
        if self.mode != "quiet":
            print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.t0 = time.perf_counter()
        self._last_draw = 0.0

    def due(self) -> bool:
        return self.mode == "bar" and time.perf_counter() - self._last_draw >= self.min_interval

    def update(self, step: int, examples: int, loss: float) -> None:
        if self.mode != "bar":
            return
        self._last_draw = now = time.perf_counter()
        width = 24
        done = int(width * step / max(self.steps, 1))
        rate = examples / max(now - self.t0, 1e-9)
        line = (
            f"\repoch {self.epoch + 1}/{self.epochs} [{'#' * done}{'.' * (width - done)}] "
            f"{step}/{self.steps}  loss {loss:.4f}  {rate:,.0f} ex/s"
        )
        self.stream.write(line)
        self.stream.flush()

    def end_epoch(self, summary: str) -> None:
        if self.mode == "bar":
            self.stream.write("\r\033[K" + summary + "\n")
            self.stream.flush()
        elif self.mode == "lines":
            print(summary, file=self.stream, flush=True)
