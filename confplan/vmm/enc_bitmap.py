"""The page-encryption bitmap (the seed's "encrypted page bitmap"): one bit per guest page, 1 = private
(encrypted), which every page is until the guest reports it shared through KVM_HC_MAP_GPA_RANGE (the
hypercall or the MMIO doorbell with the same arguments). ``dirty AND enc`` = private dirty pages.

A guest converts pages while it migrates (Linux: bounce buffers, DMA, the GHCB), so the bitmap also keeps
what changed: ``generation`` counts the reports that changed a page's kind, and a log of those pages
(``converted_since``, ``take_converted``) lets a migration re-send every converted page as its new kind and
drop from a shared frame any page converted after the round read the bitmap (docs/migration.md,
"Conversions while the guest runs")."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from confplan.vmm.abi import MAP_GPA_RANGE_ENCRYPTED, PAGE, RAM_HOLE_END, RAM_HOLE_START
from confplan.vmm.bitmap import PageBitmap


class EncStatusError(Exception):
    """The guest reported a range outside its RAM or with an unaligned GPA."""


@dataclass
class EncStats:
    reports: int = 0
    last: tuple[int, int, int] | None = None
    conversions: int = 0  # pages whose kind a report changed


class EncBitmap:
    def __init__(self, npages: int) -> None:
        self.bitmap = PageBitmap(npages)
        self.bitmap.fill()
        self.stats = EncStats()
        self._lock = threading.Lock()
        self.generation = 0  # reports that changed some page's kind
        self._log: list[tuple[int, int, int]] = []  # (generation, first page, npages) since take_converted

    @property
    def address(self) -> int:
        return self.bitmap.address

    def is_private(self, page: int) -> bool:
        return self.bitmap.test(page)

    def sha256(self) -> str:
        """The bitmap's SHA-256 (hex): how the two sides of a migration compare theirs."""
        with self._lock:
            return hashlib.sha256(self.bitmap.view()).hexdigest()

    def shared_pages(self) -> int:
        return self.bitmap.npages - self.bitmap.count()

    def map_gpa_range(self, gpa: int, npages: int, attrs: int) -> None:
        """Apply one KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs) report."""
        first = gpa // PAGE
        hole = gpa < RAM_HOLE_END and gpa + npages * PAGE > RAM_HOLE_START  # no RAM there (v8)
        if gpa % PAGE or npages < 0 or first + npages > self.bitmap.npages or hole:
            raise EncStatusError(
                f"KVM_HC_MAP_GPA_RANGE(gpa={gpa:#x}, npages={npages}, attrs={attrs:#x}) is outside guest RAM "
                f"({self.bitmap.npages} pages, less the hole under 4 GiB) or unaligned"
            )
        private = bool(attrs & MAP_GPA_RANGE_ENCRYPTED)
        with self._lock:
            was_private = self.bitmap.count_range(first, first + npages)
            changed = npages - was_private if private else was_private
            self.bitmap.set_range(first, npages, private)
            self.stats.reports += 1
            self.stats.last = (gpa, npages, attrs)
            if changed:
                # Logged under the lock, before the guest's vCPU goes on (and writes the page as its new
                # kind): whoever reads the page after that write sees this generation.
                self.generation += 1
                self.stats.conversions += changed
                self._log.append((self.generation, first, npages))

    def converted_since(self, generation: int) -> set[int]:
        """The pages whose kind changed after ``generation`` (since the last ``take_converted`` at most)."""
        with self._lock:
            log = [entry for entry in self._log if entry[0] > generation]
        return {page for _, first, npages in log for page in range(first, first + npages)}

    def take_converted(self) -> tuple[int, int]:
        """(bitmask of the pages converted since the last take, the generation it covers); starts a new log.
        A bitmask (a Python int) because the dirty tracker merges it into its pending set in one step."""
        with self._lock:
            log, self._log = self._log, []
            generation = self.generation
        mask = 0
        for _, first, npages in log:
            mask |= ((1 << npages) - 1) << first
        return mask, generation
