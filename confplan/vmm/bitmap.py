"""A page bitmap in one C-contiguous buffer of 64-bit words (bit i of word i//64 = page i), so C code
(the page-transfer core) scans it in place through ``address``."""

from __future__ import annotations

import ctypes


class PageBitmap:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.nwords = (npages + 63) // 64
        self.words = (ctypes.c_uint64 * self.nwords)()

    @property
    def address(self) -> int:
        return ctypes.addressof(self.words)

    @property
    def nbytes(self) -> int:
        return self.nwords * 8

    def view(self) -> memoryview:
        return memoryview(self.words).cast("B")

    def test(self, page: int) -> bool:
        return bool(self.words[page >> 6] >> (page & 63) & 1)

    def clear(self) -> None:
        ctypes.memset(self.address, 0, self.nbytes)

    def fill(self) -> None:
        """Set every page's bit (and none past ``npages``)."""
        self.set_range(0, self.npages, True)

    def set_range(self, first: int, count: int, value: bool) -> None:
        """Set or clear bits [first, first+count): whole words with memset, the edges bit by bit."""
        end = first + count
        if first < 0 or end > self.npages:
            raise IndexError(f"pages [{first}, {end}) outside bitmap of {self.npages}")
        while first < end and first & 63:
            self._set_bit(first, value)
            first += 1
        whole = (end - first) // 64
        if whole:
            ctypes.memset(self.address + first // 8, 0xFF if value else 0, whole * 8)
            first += whole * 64
        while first < end:
            self._set_bit(first, value)
            first += 1

    def _set_bit(self, page: int, value: bool) -> None:
        mask = 1 << (page & 63)
        word = self.words[page >> 6]
        self.words[page >> 6] = word | mask if value else word & ~mask

    def as_int(self) -> int:
        return int.from_bytes(self.view(), "little")

    def count(self) -> int:
        return self.as_int().bit_count()

    def pages(self, first: int = 0, end: int | None = None) -> list[int]:
        """Indices of set bits in [first, end)."""
        end = self.npages if end is None else end
        out: list[int] = []
        for w in range(first >> 6, (end + 63) >> 6):
            word = self.words[w]
            while word:
                low = word & -word
                page = (w << 6) + low.bit_length() - 1
                if first <= page < end:
                    out.append(page)
                word ^= low
        return out

    def count_range(self, first: int, end: int) -> int:
        return len(self.pages(first, end))
