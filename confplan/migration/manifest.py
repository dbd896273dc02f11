"""The manifest (mailbox v5, docs/mailbox.md "The manifest and sealed vCPU state"): what a VMM hands its
migration helper for SEAL_MANIFEST / CHECK_MANIFEST, what the check's answer means, and the clear head of a
sealed manifest or vCPU state.

The manifest itself is the helpers' business: the source MH digests its own tables and seals them, the
target MH recomputes from its own and compares. A VMM only supplies what the helpers cannot know (the
encryption bitmap, a hash of the state it sends or received, the round count) and carries the sealed bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from confplan.migration.mailbox_layout import (
    MANIFEST_CHUNK_ALIGN,
    MANIFEST_CHUNK_MAX,
    PAGE_SIZE,
    REQUEST_STRUCT,
    SEALED_HEAD,
    SEALED_HEAD_STRUCT,
    MailboxError,
    MhStatus,
    Op,
    status_name,
)

# What each refusal names: the manifest field that differs (one per status of MANIFEST_REFUSALS).
FIELDS: dict[MhStatus, str] = {
    MhStatus.MANIFEST_AUTH: "seal",
    MhStatus.MANIFEST_ID: "migration id",
    MhStatus.MANIFEST_RANGE: "range",
    MhStatus.MANIFEST_BITMAP: "encryption bitmap",
    MhStatus.MANIFEST_STATE: "state hash",
    MhStatus.MANIFEST_ROUNDS: "round count",
    MhStatus.MANIFEST_VMSA: "vCPU state",
    MhStatus.MANIFEST_GENERATIONS: "generation table",
    MhStatus.MANIFEST_MAC: "MAC table",
    MhStatus.MANIFEST_BUSY: "tables changed during the check",
}


def state_hash(parts: Iterable[bytes]) -> bytes:
    """SHA-256 of the vCPU and device state blobs a VMM sent or received, in stream order, each length
    prefixed (u64 LE), so both VMMs compute the same 32 bytes from the same frames."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def range_bits(enc_bitmap: bytes | memoryview, start: int, npages: int) -> bytes:
    """The bits of pages [start, start + npages pages) of a whole guest's encryption bitmap (bit p = page p,
    1 = private: ``EncBitmap``'s format), as the helper reads them: bit i = page start / 4096 + i."""
    first = start // PAGE_SIZE
    if start % PAGE_SIZE or len(enc_bitmap) * 8 < first + npages:
        raise ValueError(
            f"an encryption bitmap of {len(enc_bitmap)} bytes does not cover {npages} pages from {start:#x}"
        )
    bits = int.from_bytes(enc_bitmap, "little") >> first & ((1 << npages) - 1)
    return bits.to_bytes((npages + 7) // 8, "little")


def request(
    start: int, npages: int, chunk_pages: int, *, enc_bitmap: bytes | memoryview, state_hash: bytes,
    rounds: int, sealed: bytes = b"",
) -> bytes:  # fmt: skip
    """The bytes SEAL_MANIFEST (``sealed`` empty) or CHECK_MANIFEST reads from its first slot."""
    if len(state_hash) != 32:
        raise ValueError(f"the state hash is 32 bytes (SHA-256), not {len(state_hash)}")
    if not (0 < chunk_pages <= MANIFEST_CHUNK_MAX and chunk_pages % MANIFEST_CHUNK_ALIGN == 0) or npages < 1:
        raise ValueError(
            f"a manifest of {npages} pages in chunks of {chunk_pages}: chunks are a multiple of "
            f"{MANIFEST_CHUNK_ALIGN} pages, at most {MANIFEST_CHUNK_MAX}"
        )
    bits = range_bits(enc_bitmap, start, npages)
    padded = bits + bytes(-len(bits) % 16)
    return REQUEST_STRUCT.pack(state_hash, rounds, len(bits), len(sealed)) + padded + sealed


@dataclass(frozen=True)
class SealedHead:
    """The clear head of a sealed manifest or vCPU state (``struct cp_sealed_blob``)."""

    magic: int
    version: int
    flags: int
    length: int
    key_id: int
    migration_id: bytes
    nonce: bytes
    label: int
    tag: bytes

    @property
    def sender_id(self) -> int:
        """The sealing helper's nonce prefix: side << 16 | index (side 0 = source)."""
        return int.from_bytes(self.nonce[:4], "big")


def sealed_head(record: bytes) -> SealedHead:
    """The head of a sealed record (nothing is checked: only the target's helper can do that)."""
    if len(record) < SEALED_HEAD:
        raise ValueError(f"a sealed record has a {SEALED_HEAD}-byte head; got {len(record)} bytes")
    return SealedHead(*SEALED_HEAD_STRUCT.unpack_from(record))


@dataclass(frozen=True)
class ManifestResult:
    """A manifest the target's helper verified: it now holds "verified" for this migration."""

    migration_id: bytes
    start: int
    npages: int
    chunk_pages: int
    chunks: int


class ManifestRefused(MailboxError):
    """The target's helper refused the manifest. ``field`` names what differs (``FIELDS``); ``index`` is
    the chunk (generations, MAC) or the vCPU (vCPU state) it names, else None."""

    def __init__(self, message: str, *, field: str, index: int | None, mh_index: int, status: int) -> None:
        super().__init__(
            message, op=Op.CHECK_MANIFEST, mh_index=mh_index, status=status,
            hint="the target must not resume; the source keeps running: rerun the migration",
        )  # fmt: skip
        self.field, self.index = field, index


def refusal(
    status: int, *, first_bad: int, n_refused: int, start: int, chunk_pages: int, mh_index: int
) -> ManifestRefused:
    """The error for a CHECK_MANIFEST status that refuses the manifest (a MANIFEST_* status)."""
    st = MhStatus(status)
    index: int | None = None
    where = ""
    if st in (MhStatus.MANIFEST_GENERATIONS, MhStatus.MANIFEST_MAC) and first_bad != 0xFFFFFFFF:
        index = first_bad
        low = start + first_bad * chunk_pages * PAGE_SIZE
        where = (
            f" in chunk {first_bad} (GPAs [{low:#x}, {low + chunk_pages * PAGE_SIZE:#x}))"
            f"{f' and {n_refused - 1} more chunks' if n_refused > 1 else ''}"
        )
    elif st is MhStatus.MANIFEST_VMSA:
        index = first_bad
        where = f" of vCPU {first_bad}"
    what = {
        MhStatus.MANIFEST_AUTH: "it does not open",
        MhStatus.MANIFEST_BUSY: "its tables changed while it checked",
    }.get(st, f"the {FIELDS[st]}{where} differs from the source's")
    return ManifestRefused(
        f"the target's migration helper refused the manifest: {what}: {status_name(status)}",
        field=FIELDS[st], index=index, mh_index=mh_index, status=status,
    )  # fmt: skip
