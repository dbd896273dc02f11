"""KVM's dirty log, one ``PageBitmap`` per memslot, filled in place by KVM_GET_DIRTY_LOG.

Pages in ``keep_writable`` (the migration helper's area: its mailbox slots and tables, which it writes on
every SAVE) are never write-protected again after their first write, where KVM offers manual dirty-log
protection: a fetch then clears (and write-protects) only the other pages it found dirty. On kvm_pvm a
write-protect fault costs ~20 us: re-protecting the slots each round made the pause's final round of
~1600 pages take ~38 ms (docs/migration.md, "Session 5"). The bitmap never reports those pages (nobody
sends them: they are not the guest's).
"""

from __future__ import annotations

from dataclasses import dataclass

from confplan.kvm import KvmError, Vm
from confplan.kvm import structs as s
from confplan.vmm.bitmap import PageBitmap


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int


class DirtyLog:
    """Each ``fetch`` overwrites the slot bitmaps with the pages written since the previous fetch."""

    def __init__(self, vm: Vm, slots: list[Memslot], *, keep_writable: range | None = None) -> None:
        self._vm = vm
        self.slots = slots
        self.bitmaps = {m.slot: PageBitmap(m.size // 4096) for m in slots}
        self._keep = keep_writable
        self.manual = keep_writable is not None and self._enable_manual()

    def _enable_manual(self) -> bool:
        """Manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, bit 0 only: pages start write-protected as
        without it); False where KVM does not offer it (then every fetch re-protects everything)."""
        try:
            if not self._vm.check_extension(s.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & 1:
                return False
            self._vm.enable_cap(s.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
        except KvmError:
            return False
        return True

    def fetch(self, slot: int = 0) -> PageBitmap:
        """KVM_GET_DIRTY_LOG into the slot's bitmap (zero copy); KVM clears its own copy (with manual
        protection: of every page it reported but those kept writable)."""
        bitmap = self.bitmaps[slot]
        self._vm.get_dirty_log(slot, bitmap.address)
        if self.manual:
            self._rearm(slot, bitmap)
        return bitmap

    def _rearm(self, slot: int, bitmap: PageBitmap) -> None:
        """Clear in KVM (and write-protect again) what the fetch reported, but the pages kept writable,
        which the bitmap then never reports (nothing sends them: they are not the guest's)."""
        keep = self._keep
        if keep is not None:  # the helper's area is 2 MiB aligned: whole bytes of the bitmap
            raw = bitmap.view()
            first, end = keep.start // 8, min(-(-keep.stop // 8), len(raw))
            raw[first:end] = bytes(end - first)
        self._vm.clear_dirty_log(slot, 0, bitmap.npages, bitmap.address)

    def clear(self) -> None:
        """Start a new round: fetch and drop what was dirty so far."""
        for m in self.slots:
            self.fetch(m.slot)
