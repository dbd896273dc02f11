"""Waiting for a guest or a peer to do something, without asserting how long it takes: poll until the
predicate holds or a generous deadline passes (a loaded CI machine may be slow; it is never asked to be
fast)."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(predicate: Callable[[], bool], seconds: float = 10.0, *, poll: float = 0.01) -> bool:
    """True as soon as ``predicate()`` is; False if it still is not after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True
