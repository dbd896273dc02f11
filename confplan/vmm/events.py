"""Progress events the guest reports through the EVENT doorbell (CP_EV_*), counted per vCPU, with waits."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable


class EventLog:
    def __init__(self, check_failed: Callable[[], None]) -> None:
        self._cond = threading.Condition()
        self._counts: Counter[tuple[int, int]] = Counter()
        self._check_failed = check_failed

    def record(self, vcpu: int, code: int) -> None:
        with self._cond:
            self._counts[(vcpu, code)] += 1
            self._cond.notify_all()

    def count(self, vcpu: int, code: int) -> int:
        with self._cond:
            return self._counts[(vcpu, code)]

    def poke(self) -> None:
        """Wake waiters (the machine failed or stopped)."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, code: int, vcpus: Iterable[int], timeout: float, at_least: int = 1) -> bool:
        """Wait until every vCPU in ``vcpus`` reported ``code`` at least ``at_least`` times; raises the
        machine's error if it failed meanwhile; False on timeout."""
        want = list(vcpus)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._check_failed()
                if all(self._counts[(v, code)] >= at_least for v in want):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.25))
