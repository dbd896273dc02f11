"""KVM's dirty log over every memslot, off until ``start`` (or the first ``clear``): a source turns it on
when a migration begins, as QEMU does, so the guest runs on 2 MiB mappings until then, and its helper can map
RAM the same way first (mailbox WARM). Then merged into one GPA-indexed ``PageBitmap`` (bit i = page i) and
filled in place by KVM_GET_DIRTY_LOG: each slot's log is written at its first page's word, so RAM above
4 GiB needs no copy (a slot starts on a multiple of 64 pages: 2 MiB-aligned RAM, the hole at 4 GiB).

Pages in ``keep_writable`` (the migration helper's area: its mailbox slots and tables, which it writes on
every SAVE) are never write-protected again after their first write, where KVM offers manual dirty-log
protection: a fetch then clears (and write-protects) only the other pages it found dirty. On kvm_pvm a
write-protect fault costs ~20 us: re-protecting the slots each round made the pause's final round of
~1600 pages take ~38 ms (docs/migration.md, "Session 5"). The bitmap never reports those pages (nobody
sends them: they are not the guest's).

With manual protection a migration re-arms each page just before it reads it instead (``rearm``, given to
the readers; ``fetch(rearm=False)``): a page keeps its mapping and its bit until then, so a guest write to
a page not yet sent costs no fault and is sent with the round; where KVM also offers
KVM_DIRTY_LOG_INITIALLY_SET, turning the log on write-protects nothing (every bit starts set).
"""

from __future__ import annotations

from confplan.core.rearm import Rearm
from confplan.kvm import KvmError, Vm
from confplan.kvm import structs as s
from confplan.vmm.abi import PAGE
from confplan.vmm.bitmap import PageBitmap
from confplan.vmm.memory import GuestRam


class DirtyLog:
    """Each ``fetch`` overwrites the bitmap with the pages written since the previous fetch."""

    def __init__(self, vm: Vm, ram: GuestRam, *, keep_writable: range | None = None) -> None:
        slots = ram.memslots()
        if any(m.gpa % (64 * PAGE) or m.size % (64 * PAGE) for m in slots):
            raise ValueError(f"memslots must start and end on a 64-page boundary: {slots}")
        self._vm = vm
        self.slots = slots
        self.bitmap = PageBitmap(max(m.gpa + m.size for m in slots) // PAGE)
        self._keep = keep_writable
        self.initially_set = False  # KVM_DIRTY_LOG_INITIALLY_SET: the log goes on with every bit set
        self.manual = keep_writable is not None and self._enable_manual()
        self._ram = ram
        self.started = False

    def start(self) -> None:
        """Turn logging on (KVM_MEM_LOG_DIRTY_PAGES on every slot, a flags-only change): KVM write-protects
        what is mapped, so the next write to each page is logged, and from then on maps RAM 4 KiB at a
        time (it must see each write). Until then the guest runs on 2 MiB mappings, as QEMU's do."""
        self._ram.map_into(self._vm, s.KVM_MEM_LOG_DIRTY_PAGES)
        self.started = True

    def _enable_manual(self) -> bool:
        """Manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bit 0), with bit 1 (initially set) where
        offered; False where KVM offers neither (then every fetch re-protects everything)."""
        try:
            offered = self._vm.check_extension(s.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            if not offered & s.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                return False
            flags = offered & (s.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | s.KVM_DIRTY_LOG_INITIALLY_SET)
            self._vm.enable_cap(s.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
        except KvmError:
            return False
        self.initially_set = bool(flags & s.KVM_DIRTY_LOG_INITIALLY_SET)
        return True

    def rearm(self) -> Rearm | None:
        """What a reader needs to re-arm pages just before it reads them (None without manual protection:
        then only a fetch re-arms, everything it reports)."""
        if not self.manual:
            return None
        return Rearm(self._vm.fd, self.slots)

    def fetch(self, *, rearm: bool = True) -> PageBitmap:
        """KVM_GET_DIRTY_LOG of every slot into its part of the bitmap (zero copy); KVM clears its own
        copy (with manual protection: of every page it reported but those kept writable, or with ``rearm``
        False of none: the readers re-arm what they read, docs/dirty-log.md). The bits between slots (the
        hole) are never set."""
        if not self.started:
            raise RuntimeError("the dirty log is off: clear() turns it on and starts the first round")
        for m in self.slots:
            self._vm.get_dirty_log(m.slot, self.bitmap.address + m.gpa // PAGE // 8)
        if self.manual and rearm:
            self._rearm()
        else:
            self._drop_kept()
        return self.bitmap

    def _rearm(self) -> None:
        """Clear in KVM (and write-protect again) what the fetch reported, but the pages kept writable,
        which the bitmap then never reports (nothing sends them: they are not the guest's)."""
        self._drop_kept()
        for m in self.slots:
            self._vm.clear_dirty_log(m.slot, 0, m.size // PAGE, self.bitmap.address + m.gpa // PAGE // 8)

    def _drop_kept(self) -> None:
        keep = self._keep
        if keep is not None:  # the helper's area is 2 MiB aligned: whole bytes of the bitmap
            raw = self.bitmap.view()
            first, end = keep.start // 8, min(-(-keep.stop // 8), len(raw))
            raw[first:end] = bytes(end - first)

    def clear(self) -> None:
        """Start a new round: fetch and drop what was dirty so far (logging turned on if it was off)."""
        if not self.started:
            self.start()
        self.fetch()
