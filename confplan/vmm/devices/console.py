"""The console: the guest stores ``gpa | len << 48`` of a text line; the VMM logs and shows it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TextIO

from confplan.errors import ConfplanError

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner

MAX_LINE = 4096


class Readable(Protocol):
    def read(self, gpa: int, n: int) -> bytes: ...


class Console:
    name = "console"

    def __init__(
        self, memory: Readable, echo: Callable[[str], None] | None = None, log: TextIO | None = None
    ) -> None:
        # The Machine, whose read refuses the secret page: a guest cannot get the VMM to print the key.
        self._memory = memory
        self._echo = echo
        self._log = log
        self.lines: deque[tuple[int, str]] = deque(maxlen=10000)
        self._cond = threading.Condition()

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        gpa, length = value & ((1 << 48) - 1), min(value >> 48, MAX_LINE)
        try:
            text = self._memory.read(gpa, length).decode("utf-8", "replace").rstrip("\n")
        except ConfplanError as err:
            text = f"(console line refused: {err.message})"
        self.emit(vcpu.index, text)

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        return 0

    def emit(self, vcpu: int, text: str) -> None:
        line = f"[vcpu{vcpu}] {text}"
        with self._cond:
            self.lines.append((vcpu, text))
            self._cond.notify_all()
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self._echo is not None:
            self._echo(line)

    def text(self) -> str:
        with self._cond:
            return "\n".join(f"[vcpu{v}] {t}" for v, t in self.lines)

    def wait_for(self, needle: str, timeout: float) -> str | None:
        """The first line containing ``needle`` (waiting up to ``timeout`` s), else None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, text in self.lines:
                    if needle in text:
                        return text
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
