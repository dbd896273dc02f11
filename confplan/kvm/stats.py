"""KVM binary statistics (KVM_GET_STATS_FD): read once the descriptors, then values by name."""

from __future__ import annotations

import ctypes
import os

from confplan.kvm.structs import KvmStatsDescHead, KvmStatsHeader


class StatsFd:
    """One stats file descriptor (VM or vCPU); owns and closes it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        header = KvmStatsHeader.from_buffer_copy(os.pread(fd, ctypes.sizeof(KvmStatsHeader), 0))
        desc_size = ctypes.sizeof(KvmStatsDescHead) + header.name_size
        raw = os.pread(fd, desc_size * header.num_desc, header.desc_offset)
        self._fields: dict[str, tuple[int, int]] = {}  # name -> (offset of first u64, count)
        for i in range(header.num_desc):
            base = i * desc_size
            head = KvmStatsDescHead.from_buffer_copy(raw, base)
            name_raw = raw[base + ctypes.sizeof(KvmStatsDescHead) : base + desc_size]
            name = name_raw.split(b"\0", 1)[0].decode()
            self._fields[name] = (header.data_offset + head.offset, head.size)

    @property
    def names(self) -> list[str]:
        return sorted(self._fields)

    def read(self, *names: str) -> dict[str, int]:
        """Current values (the first u64 of each stat); all stats when no names are given."""
        wanted = names or tuple(self._fields)
        out: dict[str, int] = {}
        for name in wanted:
            offset, _count = self._fields[name]
            out[name] = int.from_bytes(os.pread(self._fd, 8, offset), "little")
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StatsFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
