"""Where the firmware's CPL0 exception handler reports a fault before it halts the vCPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from confplan.vmm import abi
from confplan.vmm.exits import GuestFault

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner


class FaultReporter:
    name = "fault"

    def __init__(self) -> None:
        self._latch: dict[int, dict[int, int]] = {}

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        latch = self._latch.setdefault(vcpu.index, {})
        if offset != abi.FAULT_COMMIT:
            latch[offset] = value
            return
        raise GuestFault(
            vcpu=vcpu.index,
            vector=latch.get(abi.FAULT_VECTOR, -1),
            error=latch.get(abi.FAULT_ERROR, 0),
            rip=latch.get(abi.FAULT_RIP, 0),
            cs=latch.get(abi.FAULT_CS, 0),
            rsp=latch.get(abi.FAULT_RSP, 0),
            cr2=latch.get(abi.FAULT_CR2, 0),
        )

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        return 0
