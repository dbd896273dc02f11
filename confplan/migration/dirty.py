"""Which pages a round must send: KVM's dirty log gathered into a pending set, the guest's pages only.

Bitmaps are Python ints while they are combined (one big-int operation per round, no loop over pages)
and bytes when handed to the core's ``scan_dirty``.
"""

from __future__ import annotations

import array

from confplan.vmm import Machine


def _mask(first: int, end: int) -> int:
    return ((1 << (end - first)) - 1) << first


class DirtyTracker:
    """Pending dirty pages of one source machine. The first round sends every page (all start dirty)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.npages = int(machine.layout.npages)
        self.nbytes = (self.npages + 63) // 64 * 8
        # Every guest page, the CPL0 area below the workload included; never the MH's own pages (its area,
        # page tables, CPL0 stacks: the target's MH runs on its own, and refuses them, GPA_MH).
        self.migratable = machine.layout.guest_page_mask()
        self.pending = self.migratable
        self.generation = 0  # the encryption bitmap's generation the last take covers

    def reset(self) -> None:
        """A new stream: everything is pending again (the target starts from nothing)."""
        self._machine.dirty_log.clear()  # logging on if it was off; what it held is covered by the full set
        self._machine.enc_bitmap.take_converted()  # and the conversions: the full set covers them too
        self.pending = self.migratable

    def collect(self) -> int:
        """Add what KVM logged since the last fetch; returns the pending count."""
        log = self._machine.dirty_log.fetch()
        self.pending |= int.from_bytes(log.view(), "little") & self.migratable
        return self.pending.bit_count()

    def take(self) -> bytes:
        """Collect, add every page converted between private and shared since the last take (it must go
        again as its new kind, written or not), hand out the pending set as a bitmap, and start the next
        one empty. ``generation`` is then the encryption bitmap's generation this set covers."""
        self.collect()
        converted, self.generation = self._machine.enc_bitmap.take_converted()
        out, self.pending = (self.pending | converted) & self.migratable, 0
        return out.to_bytes(self.nbytes, "little")

    def shared_bitmap(self) -> bytes:
        """Bit set = shared: the complement of the encryption bitmap (1 = private)."""
        enc = int.from_bytes(self._machine.enc_bitmap.bitmap.view(), "little")
        return (~enc & _mask(0, self.npages)).to_bytes(self.nbytes, "little")

    def shared_pages(self, enc_bitmap: bytes | None = None) -> bytes:
        """Bit set = a migratable page that is shared, by the machine's encryption bitmap or by
        ``enc_bitmap`` (same format); scanned with no kinds, so the scan lists only these pages."""
        enc = int.from_bytes(self._machine.enc_bitmap.bitmap.view() if enc_bitmap is None else enc_bitmap,
                             "little")  # fmt: skip
        return (self.migratable & ~enc).to_bytes(self.nbytes, "little")


def concat_gpas(parts: list[array.array[int]]) -> array.array[int]:
    """One GPA array of several (a round's or a frame's lists, kept as they came)."""
    out = array.array("Q")
    for part in parts:
        out.extend(part)
    return out
