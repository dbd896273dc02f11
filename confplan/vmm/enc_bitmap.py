"""The page-encryption bitmap (the seed's "encrypted page bitmap"): one bit per guest page, 1 = private
(encrypted), which every page is until the guest reports it shared through KVM_HC_MAP_GPA_RANGE (the
hypercall or the MMIO doorbell with the same arguments). ``dirty AND enc`` = private dirty pages."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from confplan.vmm.abi import MAP_GPA_RANGE_ENCRYPTED, PAGE
from confplan.vmm.bitmap import PageBitmap


class EncStatusError(Exception):
    """The guest reported a range outside its RAM or with an unaligned GPA."""


@dataclass
class EncStats:
    reports: int = 0
    last: tuple[int, int, int] | None = None


class EncBitmap:
    def __init__(self, npages: int) -> None:
        self.bitmap = PageBitmap(npages)
        self.bitmap.fill()
        self.stats = EncStats()
        self._lock = threading.Lock()

    @property
    def address(self) -> int:
        return self.bitmap.address

    def is_private(self, page: int) -> bool:
        return self.bitmap.test(page)

    def shared_pages(self) -> int:
        return self.bitmap.npages - self.bitmap.count()

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> None:
        """Apply one KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs) report."""
        first = gpa // PAGE
        if gpa % PAGE or npages < 0 or first + npages > self.bitmap.npages:
            raise EncStatusError(
                f"KVM_HC_MAP_GPA_RANGE(gpa={gpa:#x}, npages={npages}, attrs={attrs:#x}) is outside guest RAM "
                f"({self.bitmap.npages} pages) or unaligned"
            )
        with self._lock:
            self.bitmap.set_range(first, npages, bool(attrs & MAP_GPA_RANGE_ENCRYPTED))
            self.stats.reports += 1
            self.stats.last = (gpa, npages, attrs)
