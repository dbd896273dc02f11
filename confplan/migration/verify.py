"""What verify compares: the MHs' keyed digests of guest memory, and a CRC-32C of the shared pages.

The host may read shared pages, so both VMMs checksum them with the core (the pages framed in batches and
the frames' payloads CRC'd: no per-page Python); the rest is digested only by the MHs, keyed, so a host
learns nothing from a digest but whether both sides hold the same plaintext.

Private digests are per chunk of ``CHUNK_PAGES`` pages, so verify can be incremental: both sides digest
every chunk once while the guest still runs (after the last precopy round), and in the pause only the
chunks that hold a page of the final round are digested again. A chunk without such a page did not
change on the source since it was sent, nor on the target since it arrived, so its early digests stand.
"""

from __future__ import annotations

from typing import Any

from confplan.core import HostMemory, crc32c, frame_shared_pages, scan_dirty
from confplan.core.wire import HEADER_SIZE, MAX_FRAME_PAGES, shared_frame_capacity
from confplan.migration.dirty import DirtyTracker
from confplan.migration.mailbox import MailboxSet
from confplan.vmm import abi

CHUNK_PAGES = 2048  # 8 MiB: small enough that a few dirty pages leave most chunks alone


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


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Consecutive chunk indices as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(chunks)):
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def private_digests(mailboxes: MailboxSet, machine: Any, chunks: list[int] | None = None) -> dict[int, str]:
    """The MHs' keyed digests of the given chunks (all by default; the MH skips its own area)."""
    npages = int(machine.config.memory) // abi.PAGE
    wanted = list(range(chunk_count(machine))) if chunks is None else chunks
    out: dict[int, str] = {}
    for first, count in _runs(wanted):
        start_page = first * CHUNK_PAGES
        pages = min(count * CHUNK_PAGES, npages - start_page)
        digests = mailboxes.digest(start_page * abi.PAGE, pages, chunk_pages=CHUNK_PAGES)
        out.update({first + i: d.hex() for i, d in enumerate(digests)})
    return out


def touched_chunks(dirty: bytes) -> list[int]:
    """Chunks holding at least one page set in a dirty bitmap (one int test per chunk, not per page)."""
    bits = int.from_bytes(dirty, "little")
    mask = (1 << CHUNK_PAGES) - 1
    return [i for i in range(-(-len(dirty) * 8 // CHUNK_PAGES)) if bits >> (i * CHUNK_PAGES) & mask]
