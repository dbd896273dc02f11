"""The migration helper's mailbox doorbells: MH vCPU ``i`` stores the ``seq`` it just answered at
``abi.MMIO_MAILBOX + 8 * i`` (one exit per op, docs/mailbox.md). The device remembers the highest seq rung
per mailbox and wakes whoever waits for it, so the VMM sleeps until the answer instead of polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from confplan.errors import ConfplanError
from confplan.vmm.exits import GuestError

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner

DOORBELL_STRIDE = 8


class MailboxDoorbells:
    name = "mailbox-doorbells"

    def __init__(self, count: int) -> None:
        self.count = count
        self.rings = [0] * count  # doorbell exits per mailbox (for tests and the bench)
        self._rung = [0] * count
        self._cond = threading.Condition()
        self._stopped = False

    @property
    def size(self) -> int:
        return DOORBELL_STRIDE * max(self.count, 1)

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        index = offset // DOORBELL_STRIDE
        if offset % DOORBELL_STRIDE or size != 8 or index >= self.count:
            raise GuestError(
                f"{vcpu.label}: mailbox doorbell store of {size} bytes at offset {offset:#x}: this guest "
                f"has {self.count} mailboxes, one 8-byte doorbell each",
                vcpu=vcpu.index,
            )
        with self._cond:
            self.rings[index] += 1
            self._rung[index] = max(self._rung[index], value)
            self._cond.notify_all()
        # The helper answered and has nothing else until the VMM posts again, which always kicks it: park
        # it here rather than at its IDLE store right after, one exit per op instead of two. The kick is
        # latched, so a post that races this park still wakes it; ping() kicks too.
        vcpu.park(None)

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        index = offset // DOORBELL_STRIDE
        with self._cond:
            return self._rung[index] if index < self.count else 0

    def wait(self, index: int, seq: int, seconds: float, check: Callable[[], None]) -> None:
        """Sleep until mailbox ``index`` rang ``seq`` (or later), the machine stopped, or ``seconds``
        passed; then ``check()`` (which raises the machine's error, if it has one)."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._rung[index] < seq and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            stopped = self._stopped
        check()
        if stopped:
            raise ConfplanError(
                f"the machine stopped while the VMM waited for mailbox {index} (seq {seq})",
                hint="the guest was shut down; nothing can answer this mailbox any more",
            )

    def stop(self) -> None:
        """The machine failed or is closing: wake every waiter (they then see the machine's error)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
