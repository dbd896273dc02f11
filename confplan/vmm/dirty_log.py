"""KVM's dirty log over every memslot, merged into one GPA-indexed ``PageBitmap`` (bit i = page i) and
filled in place by KVM_GET_DIRTY_LOG: each slot's log is written at its first page's word, so RAM above
4 GiB needs no copy (a slot starts on a multiple of 64 pages: 2 MiB-aligned RAM, the hole at 4 GiB)."""

from __future__ import annotations

from dataclasses import dataclass

from confplan.kvm import Vm
from confplan.vmm.bitmap import PageBitmap

PAGE = 4096


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int


class DirtyLog:
    """Each ``fetch`` overwrites the bitmap with the pages written since the previous fetch."""

    def __init__(self, vm: Vm, slots: list[Memslot]) -> None:
        if any(m.gpa % (64 * PAGE) or m.size % (64 * PAGE) for m in slots):
            raise ValueError(f"memslots must start and end on a 64-page boundary: {slots}")
        self._vm = vm
        self.slots = slots
        self.bitmap = PageBitmap(max(m.gpa + m.size for m in slots) // PAGE)

    def fetch(self) -> PageBitmap:
        """KVM_GET_DIRTY_LOG of every slot into its part of the bitmap (zero copy); KVM clears its own
        copy. The bits between slots (the hole) are never set."""
        for m in self.slots:
            self._vm.get_dirty_log(m.slot, self.bitmap.address + m.gpa // PAGE // 8)
        return self.bitmap

    def clear(self) -> None:
        """Start a new round: fetch and drop what was dirty so far."""
        self.fetch()
