"""What verify compares: the MHs' keyed digests of guest memory, and a CRC-32C of the shared pages.

The host may read shared pages, so both VMMs checksum them with the core (the pages framed in batches and
the frames' payloads CRC'd: no per-page Python); the rest is digested only by the MHs, keyed, so a host
learns nothing from a digest but whether both sides hold the same plaintext.

Private digests are per chunk of ``CHUNK_PAGES`` pages. With the MHs' per-page MAC tables (mailbox v3)
the pause costs the pages changed since the tables were filled, not RAM: both sides fill their table
while the guest still runs (``MailboxSet.mac_range``), MAC again the pages written since
(``MailboxSet.mac_list``: on the source the dirty log's pages, on the target the pages its stream wrote),
then fold every chunk from the table (``MailboxSet.fold``), which equals DIGEST of the chunk while each
page's MAC is current. Without tables, every chunk is digested from memory.
"""

from __future__ import annotations

import array
from typing import Any

from confplan.core import HostMemory, crc32c, frame_shared_pages, scan_dirty
from confplan.core.wire import HEADER_SIZE, MAX_FRAME_PAGES, shared_frame_capacity
from confplan.migration.dirty import DirtyTracker
from confplan.migration.mailbox import MailboxSet
from confplan.vmm import abi

CHUNK_PAGES = 2048  # 8 MiB: a mismatch names an 8 MiB range


def shared_digest(machine: Any) -> dict[str, int]:
    """{pages, crc32c} over every shared page of the workload area, in GPA order."""
    tracker = DirtyTracker(machine)  # only its bitmaps: building one does not touch the dirty log
    everything = tracker.migratable.to_bytes(tracker.nbytes, "little")
    shared, _ = scan_dirty(everything, tracker.shared_bitmap(), tracker.npages)
    ram = HostMemory(machine.ram.address, machine.config.memory)
    buf = bytearray(shared_frame_capacity(MAX_FRAME_PAGES))
    crc = 0
    for first in range(0, len(shared), MAX_FRAME_PAGES):
        info = frame_shared_pages(ram, shared[first : first + MAX_FRAME_PAGES], buf, seq=0)
        crc = crc32c(memoryview(buf)[HEADER_SIZE : info.frame_len], crc)
    return {"pages": len(shared), "crc32c": crc}


def chunk_count(machine: Any) -> int:
    return -(-int(machine.config.memory) // abi.PAGE // CHUNK_PAGES)


def private_digests(mailboxes: MailboxSet, machine: Any) -> dict[int, str]:
    """The MHs' keyed digests of every chunk, hashed from memory (the MH skips its own area)."""
    npages = int(machine.config.memory) // abi.PAGE
    digests = mailboxes.digest(0, npages, chunk_pages=CHUNK_PAGES)
    return {i: d.hex() for i, d in enumerate(digests)}


def table_digests(mailboxes: MailboxSet, machine: Any) -> dict[int, str]:
    """The same chunk digests folded from the MHs' MAC tables (the tables must be current)."""
    npages = int(machine.config.memory) // abi.PAGE
    digests = mailboxes.fold(0, npages, chunk_pages=CHUNK_PAGES)
    return {i: d.hex() for i, d in enumerate(digests)}


def fill_mac_table(mailboxes: MailboxSet, machine: Any) -> int:
    """MAC every page of the workload area into the MHs' table; returns the pages MAC'd."""
    first = int(machine.layout.mh_end) // abi.PAGE
    return mailboxes.mac_range(first * abi.PAGE, int(machine.layout.npages) - first, chunk_pages=CHUNK_PAGES)


def gpas_of(bitmap: bytes, npages: int) -> array.array[int]:
    """The GPAs of the pages set in a bitmap, in order (the core's scan, no Python loop over pages)."""
    _, gpas = scan_dirty(bitmap, bytes(len(bitmap)), npages)
    return gpas
