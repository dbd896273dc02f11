"""Which pages a round must send: KVM's dirty log gathered into a pending set, the guest's pages only.

Bitmaps are Python ints while they are combined (one big-int operation per round, no loop over pages)
and bytes when handed to the core's ``scan_dirty``.

Where KVM offers manual dirty-log protection the tracker's fetches leave the log alone and the readers
re-arm each page just before they read it (``rearm_pages`` for the shared pages, the core's data loop
ahead of its SAVEs): a page written before it is read costs no fault and goes with the round, one written
after is logged for the next. The invariant the stream's tables rely on: a page's log is cleared only
when it is in the round about to read it (docs/dirty-log.md: the argument, and the model checked).
"""

from __future__ import annotations

import array
import os

from confplan.core.rearm import Rearm, RearmError
from confplan.errors import ConfplanError
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
        self.rearms = machine.dirty_log.manual  # the readers re-arm (else every fetch re-arms)

    def reset(self) -> None:
        """A new stream: everything is pending again (the target starts from nothing)."""
        log = self._machine.dirty_log
        if not self.rearms:
            log.clear()  # logging on if it was off; what it held is covered by the full set
        elif not log.started:
            log.start()  # the full set's reads re-arm each page
        self._machine.enc_bitmap.take_converted()  # and the conversions: the full set covers them too
        self.pending = self.migratable

    def rearm(self) -> Rearm | None:
        """A re-arm for one reader (the data loop of a channel), or None when fetches re-arm."""
        return self._machine.dirty_log.rearm() if self.rearms else None

    def rearm_pages(self, gpas: array.array[int]) -> None:
        """Re-arm ``gpas`` just before they are read (nothing when fetches re-arm)."""
        rearm = self.rearm()
        if rearm is not None:
            try:
                rearm.rearm(gpas)
            except RearmError as err:
                raise rearm_error(err.errno or 0, err.gpa) from None

    def collect(self) -> int:
        """Add what KVM logged since the last fetch; returns the pending count."""
        log = self._machine.dirty_log.fetch(rearm=not self.rearms)
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


def rearm_error(errno: int, gpa: int) -> ConfplanError:
    """KVM refused to re-arm the dirty log (KVM_CLEAR_DIRTY_LOG) at ``gpa``: the round cannot tell which
    pages the guest writes next, so it stops; the guest runs on, on the source."""
    why = os.strerror(errno) if errno else "unknown error"
    return ConfplanError(
        f"KVM refused to re-arm the source's dirty log at GPA {gpa:#x} ({why}): the round stopped",
        hint="the source guest runs on; retry the apply, and check the host kernel's log (dmesg) if it "
        "happens again",
    )


def concat_gpas(parts: list[array.array[int]]) -> array.array[int]:
    """One GPA array of several (a round's or a frame's lists, kept as they came)."""
    out = array.array("Q")
    for part in parts:
        out.extend(part)
    return out
