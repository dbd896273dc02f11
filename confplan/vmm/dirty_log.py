"""KVM's dirty log, one ``PageBitmap`` per memslot, filled in place by KVM_GET_DIRTY_LOG."""

from __future__ import annotations

from dataclasses import dataclass

from confplan.kvm import Vm
from confplan.vmm.bitmap import PageBitmap


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int


class DirtyLog:
    """Each ``fetch`` overwrites the slot bitmaps with the pages written since the previous fetch."""

    def __init__(self, vm: Vm, slots: list[Memslot]) -> None:
        self._vm = vm
        self.slots = slots
        self.bitmaps = {m.slot: PageBitmap(m.size // 4096) for m in slots}

    def fetch(self, slot: int = 0) -> PageBitmap:
        """KVM_GET_DIRTY_LOG into the slot's bitmap (zero copy); KVM clears its own copy."""
        bitmap = self.bitmaps[slot]
        self._vm.get_dirty_log(slot, bitmap.address)
        return bitmap

    def clear(self) -> None:
        """Start a new round: fetch and drop what was dirty so far."""
        for m in self.slots:
            self.fetch(m.slot)
