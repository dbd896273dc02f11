"""The source's dirty log re-armed just before pages are read (``rearm.c``; docs/dirty-log.md).

With KVM's manual dirty-log protection a fetch leaves the log alone; ``Rearm.pages`` clears (and
write-protects again) exactly the pages listed, in as few KVM_CLEAR_DIRTY_LOG calls as their runs allow.
The source's data loop does the same itself ahead of its SAVEs (``DataLoop(rearm=...)``), with the GIL
released. This layer knows only the VM's descriptor and its memslots, not the VMM's classes.
"""

from __future__ import annotations

import array
import ctypes
from dataclasses import dataclass

from confplan.core._buffers import pinned
from confplan.core._lib import lib


class RearmSlotC(ctypes.Structure):
    """struct cp_rearm_slot."""

    _fields_ = (
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("slot", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


class RearmC(ctypes.Structure):
    """struct cp_rearm."""

    _fields_ = (
        ("vm_fd", ctypes.c_int32),
        ("n_slots", ctypes.c_uint32),
        ("slots", ctypes.POINTER(RearmSlotC)),
        ("calls", ctypes.c_uint64),
        ("pages", ctypes.c_uint64),
        ("sys_errno", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
        ("bad_gpa", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class Memslot:
    """One KVM memslot of guest RAM, as the re-arm needs it (GPA and size multiples of 64 pages)."""

    slot: int
    gpa: int
    size: int


class RearmError(OSError):
    """KVM_CLEAR_DIRTY_LOG failed (``errno``), or a GPA is in no memslot (EINVAL); ``gpa`` says where."""

    def __init__(self, errno: int, gpa: int) -> None:
        super().__init__(errno, f"re-arming the dirty log at GPA {gpa:#x} failed")
        self.gpa = gpa


class Rearm:
    """One VM's dirty log as the readers re-arm it; ``calls``/``pages`` count what was done."""

    def __init__(self, vm_fd: int, slots: list[Memslot]) -> None:
        self._slots = (RearmSlotC * len(slots))(*(RearmSlotC(m.gpa, m.size, m.slot, 0) for m in slots))
        self.c = RearmC(vm_fd=vm_fd, n_slots=len(slots))
        self.c.slots = self._slots

    @property
    def calls(self) -> int:
        return int(self.c.calls)

    @property
    def pages(self) -> int:
        return int(self.c.pages)

    def rearm(self, gpas: array.array[int]) -> None:
        """Clear the log of exactly ``gpas`` (and write-protect them again) before they are read."""
        if not len(gpas):
            return
        with pinned(gpas, writable=False, what="GPA list") as (address, _):
            failed = lib().cp_rearm_pages(ctypes.byref(self.c), address, len(gpas))
        if failed:
            raise RearmError(int(self.c.sys_errno), int(self.c.bad_gpa))
