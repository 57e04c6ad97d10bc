"""Wait on a condition with a deadline, never a fixed sleep: a busy machine only makes the wait longer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_NEVER = threading.Event()  # never set: its wait() is an interruptible pause between two checks


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, poll_s: float = 0.005) -> bool:
    """True as soon as predicate() holds; False when it still does not after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        _NEVER.wait(poll_s)
    return True


def holds_for(predicate: Callable[[], bool], window_s: float) -> bool:
    """True when predicate() stays true for a whole window: the one way to observe that nothing happens."""
    return not wait_until(lambda: not predicate(), window_s)
