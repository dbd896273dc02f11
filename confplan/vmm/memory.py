"""Guest RAM: one anonymous mapping backed by 2 MiB transparent huge pages where the host allows them, so
KVM maps it with large entries (on kvm_pvm's shadow MMU: one fault per 2 MiB instead of per 32 KiB).
The mirror VM, in the same process, maps the same host addresses."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from confplan.core.rearm import Memslot
from confplan.errors import ConfplanError
from confplan.guest.layout import ram_ranges
from confplan.kvm import Vm
from confplan.vmm.pagemap import present_bytes

_T = TypeVar("_T", bound=ctypes.Structure)
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; the mmap module of Python 3.11 has no name for it
_MADV_HUGEPAGE = 14  # THP for this range also where the host's policy is "madvise" (the common default)
_MADV_DONTFORK = 10  # a child the VMM forks neither copies the guest's page tables nor makes its RAM COW
_MAP_NORESERVE = 0x4000  # sparse like a file: no commit charge for RAM the guest never touches
_HUGE_PAGE = 2 << 20
_HUGE_SLACK = 4 << 20  # RAM off huge pages that still counts as "on huge pages": the low 2 MiB, a few more
_PREFAULT_MIN = 64 << 20  # no thread for less than this
_PROT_NONE = 0  # mmap has no name for it
# mmap.madvise holds the GIL for the whole call: libc's, through ctypes, lets the threads fault in parallel
_libc = ctypes.CDLL(None, use_errno=True)  # the symbols already in this process: libc's madvise
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this host can give new guests without swapping (the kernel's MemAvailable estimate), or
    None where the kernel does not say."""
    try:
        with open(meminfo, encoding="ascii") as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name == "MemAvailable":
                    return int(value.split()[0]) * 1024  # "MemAvailable:  123456 kB"
    except (OSError, ValueError, IndexError):
        return None
    return None


# How guest RAM's mapping shows in /proc/PID/smaps (VmFlags): MADV_HUGEPAGE and MADV_DONTFORK.
GUEST_RAM_VMFLAGS = frozenset({"hg", "dc"})


@dataclass(frozen=True)
class Mapping:
    """One mapping of a process as /proc/PID/smaps describes it: its range, its kB fields, its VmFlags."""

    start: int
    end: int
    kib: dict[str, int]
    flags: frozenset[str]


def smaps(pid: int | str = "self") -> Iterator[Mapping]:
    """The mappings of process ``pid`` (for the bench: what of a VMM's RSS is guest RAM)."""
    with open(f"/proc/{pid}/smaps", encoding="ascii") as lines:
        head: tuple[int, int] | None = None
        kib: dict[str, int] = {}
        for line in lines:
            first = line.split(maxsplit=1)[0]
            key, _, value = line.partition(":")
            if "-" in first and not first.endswith(":"):  # "start-end perms offset dev inode path"
                start, _, end = first.partition("-")
                head, kib = (int(start, 16), int(end, 16)), {}
            elif key == "VmFlags" and head is not None:  # the last line of a mapping's block
                yield Mapping(*head, kib, frozenset(value.split()))
            elif value.strip().endswith("kB"):
                kib[key] = int(value.split()[0])


class GuestRam:
    """``size`` bytes of guest RAM, one private anonymous mapping laid out as the guest sees it (``ranges``:
    below the hole under 4 GiB, the rest from 4 GiB), so a GPA is an offset into it. The hole is mapped
    PROT_NONE and never backed: a stray access there faults instead of reading or writing memory no guest
    page owns. The RAM asks for transparent huge pages (``MADV_HUGEPAGE``, as QEMU does for its RAM):
    with them KVM maps 2 MiB at a time, which on kvm_pvm's shadow MMU saves the target's helper most of
    its page faults; ``huge_pages()`` says how much of it got them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ranges = ram_ranges(size)
        self.top = self.ranges[-1][1]
        self._mm: mmap.mmap | None = mmap.mmap(
            -1, self.top, mmap.MAP_PRIVATE | _MAP_NORESERVE, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._array: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * self.top).from_buffer(self._mm)
        self.address = ctypes.addressof(self._array)
        # Advice only: a host without THP (or too old for it) still runs the guest, on 4 KiB pages.
        _libc.madvise(self.address, self.top, _MADV_HUGEPAGE)
        _libc.madvise(self.address, self.top, _MADV_DONTFORK)
        for (_, hole), (start, _) in zip(self.ranges, self.ranges[1:], strict=False):
            if _libc.mprotect(self.address + hole, start - hole, _PROT_NONE) != 0:
                self.close()
                raise OSError(ctypes.get_errno(), "mprotect of the guest RAM hole failed")

    def prefault(self, threads: int | None = None) -> None:
        """Allocate and map every page now (a migration target): first touch of fresh memory costs ~3 us a
        page here (zeroing, host faults), which would otherwise be paid inside the migration, page by page
        by the helper, and a host short of memory fails here instead of halfway through a stream. Split over
        ``threads`` (default: one per CPU, at most 8), as QEMU's prealloc-threads: 2 threads took 1 GiB in
        ~1 s here where one took 2-2.4 s on 4 KiB pages (on huge pages 0.1 s, up to ~2.7 s when the kernel
        must first compact memory to find 2 MiB blocks)."""
        count = max(1, min(threads or os.cpu_count() or 1, 8, self.size // _PREFAULT_MIN))
        step = -(-self.size // count // _HUGE_PAGE) * _HUGE_PAGE  # spans end on huge-page boundaries
        spans = [(at, min(step, end - at)) for start, end in self.ranges for at in range(start, end, step)]
        with ThreadPoolExecutor(max_workers=len(spans)) as pool:
            failures = [e for e in pool.map(lambda span: self._populate(*span), spans) if e is not None]
        if failures:
            reason = os.strerror(failures[0])
            raise ConfplanError(
                f"could not allocate {self.size >> 20} MiB of guest RAM on this host: {reason}",
                hint="free memory on this host, or lower guest.memory in the plan",
            )

    def resident_bytes(self) -> int:
        """Bytes of guest RAM the host has allocated now (the mapping's Rss in /proc/self/smaps)."""
        return self._smaps_kib("Rss") * 1024

    def huge_pages(self) -> int:
        """Bytes of guest RAM on transparent huge pages now (0 where the host gives none)."""
        return self._smaps_kib("AnonHugePages") * 1024

    def on_huge_pages(self) -> bool:
        """Whether the host holds all of this RAM it has allocated on huge pages, but for at most the low
        2 MiB and a few pages: then the helper's WARM maps a 2 MiB page per read (docs/mailbox.md, "WARM").
        False where the host gives none, or where the kernel cannot say quickly (``pagemap``)."""
        found = present_bytes(self.address, self.top)
        return found is not None and found[0] > 0 and found[1] <= _HUGE_SLACK

    def _smaps_kib(self, field: str) -> int:
        """Sum of one smaps field over this mapping's pieces (the hole splits it)."""
        end = self.address + self.top
        return sum(m.kib.get(field, 0) for m in smaps() if self.address <= m.start and m.end <= end)

    def memslots(self) -> list[Memslot]:
        """One KVM memslot per RAM range (slot numbers from 0): the same for the guest's VM and a mirror."""
        return [Memslot(i, start, end - start) for i, (start, end) in enumerate(self.ranges)]

    def map_into(self, vm: Vm, flags: int = 0) -> None:
        """Set every memslot of this RAM in ``vm`` (KVM_SET_USER_MEMORY_REGION); again with other ``flags``
        is a flags-only change (the dirty log turned on)."""
        for m in self.memslots():
            vm.set_user_memory_region(m.slot, m.gpa, m.size, self.address + m.gpa, flags)

    def _populate(self, start: int, length: int) -> int | None:
        """MADV_POPULATE_WRITE over [start, start+length) through ctypes (the call runs without the GIL);
        None on success, else the errno. A kernel before 5.14 (EINVAL): a byte per page is touched."""
        if _libc.madvise(self.address + start, length, _MADV_POPULATE_WRITE) == 0:
            return None
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            return err
        assert self._mm is not None
        for gpa in range(start, start + length, mmap.PAGESIZE):
            self._mm[gpa] = self._mm[gpa]
        return None

    def _check(self, gpa: int, length: int) -> None:
        """Refuse a range that is not inside one RAM range (the hole is no RAM)."""
        if length < 0 or not any(start <= gpa and gpa + length <= end for start, end in self.ranges):
            ranges = ", ".join(f"[{start:#x}, {end:#x})" for start, end in self.ranges)
            raise ConfplanError(f"guest range [{gpa:#x}, {gpa + length:#x}) is outside guest RAM {ranges}")

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of ``gpa`` (for C code: the page-transfer core)."""
        self._check(gpa, length)
        return self.address + gpa

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest bytes [gpa, gpa+length). Release it before ``close``."""
        self._check(gpa, length)
        assert self._mm is not None
        return memoryview(self._mm)[gpa : gpa + length]

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return ctypes.string_at(self.address + gpa, length)

    def write(self, gpa: int, data: bytes) -> None:
        self._check(gpa, len(data))
        ctypes.memmove(self.address + gpa, data, len(data))

    def read_u64(self, gpa: int) -> int:
        self._check(gpa, 8)
        return int(ctypes.c_uint64.from_address(self.address + gpa).value)

    def struct_at(self, cls: type[_T], gpa: int) -> _T:
        """A ctypes struct living in guest RAM (reads and writes go straight to the guest)."""
        self._check(gpa, ctypes.sizeof(cls))
        return cls.from_address(self.address + gpa)

    def close(self) -> None:
        self._array = None
        if self._mm is not None:
            # Someone may still hold a view (e.g. a mailbox): the mapping then goes when the last view
            # does, so a late access reads stale memory instead of crashing the process.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
