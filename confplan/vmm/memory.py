"""Guest RAM backed by a memfd, so a second VM (the mirror VM) or process can map the same memory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from typing import TypeVar

from confplan.errors import ConfplanError

_T = TypeVar("_T", bound=ctypes.Structure)
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; the mmap module of Python 3.11 has no name for it


class GuestRam:
    """``size`` bytes of guest RAM at GPA 0, from a memfd mapped shared into this process."""

    def __init__(self, size: int, name: str = "confplan-ram") -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm: mmap.mmap | None = mmap.mmap(
                self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            os.close(self.fd)
            raise
        self._array: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(self._mm)
        self.address = ctypes.addressof(self._array)

    def prefault(self) -> None:
        """Allocate and map every page now (a migration target): first touch of fresh memory costs ~3 us a
        page here (zeroing, host faults), which would otherwise be paid inside the migration, page by page
        by the helper, and a host short of memory fails here instead of halfway through a stream."""
        assert self._mm is not None
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE, 0, self.size)
        except OSError as err:
            if err.errno == errno.EINVAL:  # kernel before 5.14: touch a byte per page instead
                for gpa in range(0, self.size, mmap.PAGESIZE):
                    self._mm[gpa] = self._mm[gpa]
                return
            raise ConfplanError(
                f"could not allocate {self.size >> 20} MiB of guest RAM on this host: {err.strerror}",
                hint="free memory on this host, or lower guest.memory in the plan",
            ) from None

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise ConfplanError(
                f"guest range [{gpa:#x}, {gpa + length:#x}) is outside guest RAM (size {self.size:#x})"
            )

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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
