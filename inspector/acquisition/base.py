"""Frame and Source: the seam between a camera (or a stand-in for one) and the inspection pipeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Frame:
    """One acquired image; `image` is uint8 HxWx3 RGB, or None when unreadable (reason in meta["error"])."""

    id: int
    t_acquired: float
    image: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    """A frame producer: open(), iterate frames() until exhausted or stop(), then close()."""

    def open(self) -> None: ...

    def frames(self) -> Iterator[Frame]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class PacedSource:
    """Shared plumbing for sources: per-run frame ids from 1, a thread-safe stop flag and fps pacing."""

    def __init__(self, fps: float = 0.0) -> None:
        self._fps = fps
        self._stop = threading.Event()
        self._last_id = 0
        self._next_due = 0.0

    def _start_run(self) -> None:
        """Reset the id counter and the stop flag at the start of frames()."""
        self._stop.clear()
        self._last_id = 0
        self._next_due = time.monotonic()

    def _next_id(self) -> int:
        """Monotonic frame id for this run, starting at 1."""
        self._last_id += 1
        return self._last_id

    def _pace(self) -> bool:
        """Sleep until the next frame is due (fps > 0); False when stop() was called meanwhile."""
        if self._fps > 0:
            delay = self._next_due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return False
            self._next_due = max(self._next_due + 1.0 / self._fps, time.monotonic())
        return not self._stop.is_set()

    def stop(self) -> None:
        """Make frames() end soon; safe to call from any thread."""
        self._stop.set()

    @property
    def frames_produced(self) -> int:
        """Frames yielded in the current run."""
        return self._last_id
