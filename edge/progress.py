"""Progress lines for long work (export, calibration, evaluation), on stderr so stdout stays clean."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


_STDERR = object()  # the default stream: sys.stderr as it is when writing (not when this module loaded)


class Progress:
    def __init__(self, total_steps: int = 0, stream: "TextIO | None | object" = _STDERR, enabled: bool = True):
        self.total, self.step, self._stream, self.enabled = total_steps, 0, stream, enabled
        self.t0 = time.perf_counter()

    @property
    def stream(self) -> TextIO | None:
        return sys.stderr if self._stream is _STDERR else self._stream  # type: ignore[return-value]

    def _write(self, text: str, end: str = "\n") -> None:
        if self.enabled and self.stream is not None:
            self.stream.write(text + end)
            self.stream.flush()

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.step += 1
        prefix = f"[{self.step}/{self.total}] " if self.total else ""
        self._write(f"{prefix}{title} ...", end="")
        t = time.perf_counter()
        try:
            yield
        except BaseException:
            self._write(" failed")  # end the line, so an error message starts on its own
            raise
        self._write(f" {time.perf_counter() - t:.1f}s")

    def note(self, text: str) -> None:
        self._write(f"      {text}")

    def bar(self, done: int, total: int, label: str = "") -> None:
        """A one-line counter redrawn in place (use for loops over chunks/batches)."""
        if not (self.enabled and self.stream is not None):
            return
        width = 30
        fill = int(width * done / max(total, 1))
        self.stream.write(f"\r      {label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
