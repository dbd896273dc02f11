"""vCPU services: idle (park until kicked), sleep (park for a time), progress events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from confplan.vmm import abi
from confplan.vmm.events import EventLog

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner

MAX_SLEEP_S = 1.0


class Doorbell:
    name = "doorbell"

    def __init__(self, events: EventLog) -> None:
        self._events = events

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        if offset == abi.DB_IDLE:
            vcpu.park(None)
        elif offset == abi.DB_SLEEP_NS:
            vcpu.park(min(value / 1e9, MAX_SLEEP_S))
        elif offset == abi.DB_EVENT:
            self._events.record(vcpu.index, value)

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        return 0
