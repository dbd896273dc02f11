"""What verify compares: the MHs' keyed digests of guest memory, and a CRC-32C of the shared pages.

The host may read shared pages, so both VMMs checksum them with the core (the pages framed in batches and
the frames' payloads CRC'd: no per-page Python); the rest is digested only by the MHs, keyed, so a host
learns nothing from a digest but whether both sides hold the same plaintext.

Private digests are per chunk of ``CHUNK_PAGES`` pages, hashed from memory (``private_digests``: DIGEST of
every chunk). A migration's own check no longer compares them: the MHs keep a per-page MAC table (mailbox
v4: each SAVE on the source and each LOAD on the target sets the entry of every page it seals or opens to
that record's tag; only the pages moved as shared need a MAC of their own), precopy's ``mac_table`` fill
MACs the pages moved as shared so far while the guest still runs (``MailboxSet.mac_list``), the pause MACs
those moved since (``migration.side.pause_tables``), and the source helper seals a manifest of its table
that the target helper checks against its own (mailbox v5, ``MailboxSet.seal_manifest``/``check_manifest``).

Shared pages the same way (``SharedTable``): each VMM keeps a CRC-32C per shared page, filled by that same
``mac_table`` call (a target, whose encryption bitmap arrives only at the end, fills the pages its stream
wrote as shared) and dropped for every page written since (the stream's change lists: on the source the
pages it sent, on the target the pages its stream wrote), so the pause CRCs only those, then folds the table.
"""

from __future__ import annotations

import array

from confplan.core import HostMemory, crc32c, crc_table, forget_pages, frame_shared_pages, scan_dirty, zeroed
from confplan.core.wire import HEADER_SIZE, MAX_FRAME_PAGES, shared_frame_capacity
from confplan.migration.dirty import DirtyTracker
from confplan.migration.mailbox_set import MailboxSet
from confplan.vmm import Machine

CHUNK_PAGES = 2048  # 8 MiB: a mismatch names an 8 MiB range


def shared_digest(machine: Machine) -> dict[str, int]:
    """{pages, crc32c} over every shared page of the workload area, in GPA order."""
    tracker = DirtyTracker(machine)  # only its bitmaps: building one does not touch the dirty log
    _, shared = scan_dirty(tracker.shared_pages(), None, tracker.npages)
    ram = HostMemory(machine.ram.address, machine.ram.top)
    buf = bytearray(shared_frame_capacity(MAX_FRAME_PAGES))
    crc = 0
    for first in range(0, len(shared), MAX_FRAME_PAGES):
        info = frame_shared_pages(ram, shared[first : first + MAX_FRAME_PAGES], buf, seq=0)
        crc = crc32c(memoryview(buf)[HEADER_SIZE : info.frame_len], crc)
    return {"pages": len(shared), "crc32c": crc}


class SharedTable:
    """A CRC-32C per shared page of the workload area, kept by a VMM while the guest runs.

    ``fill`` computes every current shared page's CRC, ``forget`` drops the entries of pages written since
    (the caller's change list must cover every write after ``fill``), and ``digest`` folds the table over
    the shared pages as they are now: the CRC-32C of their GPAs (u64 LE) then their page CRCs (u32 LE), in
    GPA order, computing in the pause only the entries that were dropped or never filled (a page that
    became shared). Two sides with equal shared pages get equal digests; a page that differs changes its
    CRC and so the digest (CRC-32C catches any change of up to 32 bits; wider ones with 2^-32 chance)."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._tracker = DirtyTracker(machine)  # only its bitmaps: building one does not touch the dirty log
        self.crcs = zeroed("I", self._tracker.npages)
        self.valid = bytearray(self._tracker.npages)  # 1: crcs[page] is the page's CRC as it is now
        self.computed = 0  # page CRCs computed by the last fill or digest
        self._scanned: tuple[bytes, array.array[int]] = (b"", array.array("Q"))

    def _shared_gpas(self, enc_bitmap: bytes | None = None) -> array.array[int]:
        """The shared pages' GPAs (of the machine's encryption bitmap, or of ``enc_bitmap``: a target's,
        received before it is installed); kept while the bitmap stays the same. The scan lists only the
        shared pages (0.14 ms for 1 GiB; listing the private ones too took 2.2 ms, in every pause)."""
        selected = self._tracker.shared_pages(enc_bitmap)
        if selected != self._scanned[0]:
            self._scanned = (selected, scan_dirty(selected, None, self._tracker.npages)[1])
        return self._scanned[1]

    def _compute(self, gpas: array.array[int], crc: int = 0) -> int:
        """Bring the entries of ``gpas`` up to date (in C: the pause must not walk pages in Python) and
        return ``crc`` continued over their CRCs in list order."""
        ram = HostMemory(self._machine.ram.address, self._machine.ram.top)
        crc, self.computed = crc_table(ram, gpas, self.crcs, self.valid, crc=crc)
        return crc

    def fill(self, gpas: array.array[int] | None = None) -> int:
        """Compute the CRC of the pages ``gpas`` (duplicates allowed), by default of every page shared now;
        returns the pages computed. Which pages are filled only decides what the pause need not compute:
        a target, whose encryption bitmap arrives at the end, fills the pages its stream sent as shared."""
        self.valid[:] = bytes(len(self.valid))
        self._compute(self._shared_gpas() if gpas is None else gpas)
        return self.computed

    def forget(self, gpas: array.array[int]) -> None:
        """Drop the entries of pages written since they were computed (private ones included)."""
        forget_pages(gpas, self.valid)

    def digest(self, enc_bitmap: bytes | None = None) -> dict[str, int]:
        """{pages, crc32c} of the shared pages as they are now (by ``enc_bitmap`` if given), from the table
        (see the class)."""
        gpas = self._shared_gpas(enc_bitmap)
        return {"pages": len(gpas), "crc32c": self._compute(gpas, crc32c(gpas))}


def private_digests(mailboxes: MailboxSet, machine: Machine) -> dict[int, str]:
    """The MHs' keyed digests of every chunk, hashed from memory (the MH skips its own area)."""
    npages = machine.layout.npages
    digests = mailboxes.digest(0, npages, chunk_pages=CHUNK_PAGES)
    return {i: d.hex() for i, d in enumerate(digests)}

