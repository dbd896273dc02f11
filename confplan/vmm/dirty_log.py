"""KVM's dirty log over every memslot, merged into one GPA-indexed ``PageBitmap`` (bit i = page i) and
filled in place by KVM_GET_DIRTY_LOG: each slot's log is written at its first page's word, so RAM above
4 GiB needs no copy (a slot starts on a multiple of 64 pages: 2 MiB-aligned RAM, the hole at 4 GiB).

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
from confplan.vmm.abi import PAGE
from confplan.vmm.bitmap import PageBitmap


@dataclass(frozen=True)
class Memslot:
    slot: int
    gpa: int
    size: int


class DirtyLog:
    """Each ``fetch`` overwrites the bitmap with the pages written since the previous fetch."""

    def __init__(self, vm: Vm, slots: list[Memslot], *, keep_writable: range | None = None) -> None:
        if any(m.gpa % (64 * PAGE) or m.size % (64 * PAGE) for m in slots):
            raise ValueError(f"memslots must start and end on a 64-page boundary: {slots}")
        self._vm = vm
        self.slots = slots
        self.bitmap = PageBitmap(max(m.gpa + m.size for m in slots) // PAGE)
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

    def fetch(self) -> PageBitmap:
        """KVM_GET_DIRTY_LOG of every slot into its part of the bitmap (zero copy); KVM clears its own
        copy (with manual protection: of every page it reported but those kept writable). The bits between
        slots (the hole) are never set."""
        for m in self.slots:
            self._vm.get_dirty_log(m.slot, self.bitmap.address + m.gpa // PAGE // 8)
        if self.manual:
            self._rearm()
        return self.bitmap

    def _rearm(self) -> None:
        """Clear in KVM (and write-protect again) what the fetch reported, but the pages kept writable,
        which the bitmap then never reports (nothing sends them: they are not the guest's)."""
        keep = self._keep
        if keep is not None:  # the helper's area is 2 MiB aligned: whole bytes of the bitmap
            raw = self.bitmap.view()
            first, end = keep.start // 8, min(-(-keep.stop // 8), len(raw))
            raw[first:end] = bytes(end - first)
        for m in self.slots:
            self._vm.clear_dirty_log(m.slot, 0, m.size // PAGE, self.bitmap.address + m.gpa // PAGE // 8)

    def clear(self) -> None:
        """Start a new round: fetch and drop what was dirty so far."""
        self.fetch()
