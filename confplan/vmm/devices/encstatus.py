"""The encryption-status channel: KVM_HC_MAP_GPA_RANGE's three arguments over MMIO (GPA, NPAGES, then
ATTRS, which commits). Latches are per vCPU, so vCPUs reporting at once cannot mix their arguments.
The real hypercall (KVM_EXIT_HYPERCALL) lands in the same ``EncBitmap.map_gpa_range``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from confplan.vmm import abi
from confplan.vmm.enc_bitmap import EncBitmap, EncStatusError
from confplan.vmm.exits import GuestError

if TYPE_CHECKING:
    from confplan.vmm.vcpu_thread import VcpuRunner


class EncStatusDoorbell:
    name = "encstatus"

    def __init__(self, bitmap: EncBitmap) -> None:
        self._bitmap = bitmap
        self._latch: dict[int, dict[int, int]] = {}

    def mmio_write(self, vcpu: VcpuRunner, offset: int, size: int, value: int) -> None:
        latch = self._latch.setdefault(vcpu.index, {})
        if offset != abi.ENC_ATTRS:
            latch[offset] = value
            return
        gpa, npages = latch.get(abi.ENC_GPA, 0), latch.get(abi.ENC_NPAGES, 0)
        try:
            self._bitmap.map_gpa_range(gpa, npages, value)
        except EncStatusError as err:
            raise GuestError(f"vCPU {vcpu.index}: {err}", vcpu=vcpu.index) from None

    def mmio_read(self, vcpu: VcpuRunner, offset: int, size: int) -> int:
        return 0
