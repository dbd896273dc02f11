"""The migration helper's mailbox doorbells: MH vCPU ``i`` stores the ``seq`` it just answered at
``abi.MMIO_MAILBOX + 8 * i`` (one exit per op, docs/mailbox.md). The device remembers the highest seq rung
per mailbox and wakes whoever waits for it, so the VMM sleeps until the answer instead of polling.

A helper vCPU's own C loop (``core.helper_run``) handles its doorbell itself, without the GIL: it writes the
same two words (``cell``) and the same eventfd. So the state is plain memory, one writer per mailbox (its
helper's thread), and a waiter polls the mailbox's eventfd rather than a Python condition."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confplan.errors import ConfplanError
from confplan.vmm.exits import GuestError
from confplan.vmm.vcpu_thread import Waker

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner

DOORBELL_STRIDE = 8
# A waiter re-reads the rung seq at least this often: a second waiter on the same mailbox may have taken
# the wake meant for both (the eventfd is consumed by whoever reads it first).
RECHECK_S = 0.02


@dataclass(frozen=True)
class DoorbellCell:
    """Where mailbox ``index``'s doorbell is recorded, for a C loop that rings it: the addresses of its
    highest seq and its count (uint64 each), and the eventfd to write after."""

    rung_addr: int
    rings_addr: int
    fd: int


class MailboxDoorbells:
    name = "mailbox-doorbells"

    def __init__(self, count: int) -> None:
        self.count = count
        n = max(count, 1)
        self._rung = (ctypes.c_uint64 * n)()
        self._rings = (ctypes.c_uint64 * n)()
        self._wakers = [Waker() for _ in range(n)]  # a waiter's eventfd per mailbox (a C loop holds the fd)
        self._stopped = False

    @property
    def size(self) -> int:
        return DOORBELL_STRIDE * max(self.count, 1)

    @property
    def rings(self) -> list[int]:
        """Doorbell stores per mailbox (for tests and the bench)."""
        return [int(v) for v in self._rings[: self.count]]

    def cell(self, index: int) -> DoorbellCell:
        size = ctypes.sizeof(ctypes.c_uint64)
        return DoorbellCell(
            ctypes.addressof(self._rung) + size * index, ctypes.addressof(self._rings) + size * index,
            self._wakers[index].fd,
        )  # fmt: skip

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        index = offset // DOORBELL_STRIDE
        if offset % DOORBELL_STRIDE or size != 8 or index >= self.count:
            raise GuestError(
                f"{vcpu.label}: mailbox doorbell store of {size} bytes at offset {offset:#x}: this guest "
                f"has {self.count} mailboxes, one 8-byte doorbell each",
                vcpu=vcpu.index,
            )
        self._rung[index] = max(int(self._rung[index]), value)
        self._rings[index] += 1
        self._wakers[index].wake()
        # The helper answered and has nothing else until the VMM posts again, which always kicks it: park
        # it here rather than at its IDLE store right after, one exit per op instead of two. The kick is
        # latched, so a post that races this park still wakes it; ping() kicks too.
        vcpu.park(None)

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        index = offset // DOORBELL_STRIDE
        return int(self._rung[index]) if index < self.count else 0

    def wait(self, index: int, seq: int, seconds: float, check: Callable[[], None]) -> None:
        """Sleep until mailbox ``index`` rang ``seq`` (or later), the machine stopped, or ``seconds``
        passed; then ``check()`` (which raises the machine's error, if it has one)."""
        deadline = time.monotonic() + seconds
        while self._rung[index] < seq and not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wakers[index].wait(min(left, RECHECK_S))  # another waiter may consume the wake first
        check()
        if self._stopped:
            raise ConfplanError(
                f"the machine stopped while the VMM waited for mailbox {index} (seq {seq})",
                hint="the guest was shut down; nothing can answer this mailbox any more",
            )

    def stop(self) -> None:
        """The machine failed or is closing: wake every waiter (they then see the machine's error)."""
        self._stopped = True
        for waker in self._wakers:
            waker.wake()
