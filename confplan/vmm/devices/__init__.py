"""MMIO devices. Each registers an address range on the ``MmioBus``; the vCPU loop hands it the exits
that fall there. All of them are doorbells: a store is one exit, so the guest batches work behind them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from confplan.errors import ConfplanError

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner


class MmioDevice(Protocol):
    name: str

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None: ...

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int: ...


class MmioBus:
    """Address ranges to devices (kvmtool mmio.c). Few devices, so a list scan."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int, MmioDevice]] = []

    def register(self, base: int, size: int, device: MmioDevice) -> None:
        for b, sz, d in self._ranges:
            if base < b + sz and b < base + size:
                raise ConfplanError(f"MMIO range {base:#x}+{size:#x} of {device.name} overlaps {d.name}")
        self._ranges.append((base, size, device))

    def find(self, addr: int) -> tuple[MmioDevice, int] | None:
        for base, size, device in self._ranges:
            if base <= addr < base + size:
                return device, addr - base
        return None
